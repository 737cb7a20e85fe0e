"""Worker for ``test_tp_group.py`` (``torchrun --nproc_per_node 4``, gloo, no vLLM; not collected).

Every rank builds ``TPGroup.create(2)`` (groups [0, 1] and [2, 3]), exercises its shares, ``from_leader``
(results, exceptions, what does not pickle), ``check_identical``, ``checked_from_leader`` and ``run_episodes``
with a scripted engine, in rounds and streaming, and a gym whose feedback names the rank that stepped it (also
with engines that diverge on one rank, and a gym factory that fails on the leader), then writes
``rank<r>.json`` into ``argv[1]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

from bao_fast.envs.base import Gym, StepResult, ToolCall
from bao_fast.envs.user_client import UserSimulatorError
from bao_fast.models import load_tokenizer
from bao_fast.rollout import Generation, GenerationParams, TPGroup, run_episodes


class Unpicklable(Exception):
    """An exception that pickles but does not unpickle (its ``__init__`` takes a keyword-only argument)."""

    def __init__(self, *, why: str) -> None:
        super().__init__(why)


class RankGym(Gym):
    """Feedback names the stepping rank; task "bug" raises on its second step (a gym bug)."""

    name = "rank"
    steps = 0

    def _reset(self, task: Any) -> list[dict[str, str]]:
        self.task = task
        return [{"role": "user", "content": f"Task {task}."}]

    def _act(self, call: ToolCall) -> Any:
        raise AssertionError("unreachable")

    def step(self, action_text: str) -> StepResult:
        RankGym.steps += 1
        self._turn += 1
        if self.task == "bug" and self._turn == 2:
            raise ZeroDivisionError("gym bug")
        self._done = self._turn >= self.max_turns
        info = {"choice": "action", "user_involved": False, "success": False, "turn": self._turn}
        return StepResult(f"rank {dist.get_rank()} turn {self._turn}", 0.0, False, self._done, info)


class EchoEngine:
    """Replies to every prompt with its length's last digit, then eos."""

    max_model_len = 512

    def __init__(self, eos: int) -> None:
        self.eos, self.prompts = eos, []

    def generate(self, prompts: list[list[int]], params: GenerationParams) -> list[Generation]:
        self.prompts.append(prompts)
        return [Generation([48 + len(p) % 10, self.eos], None, "stop") for p in prompts]


class StreamingEchoEngine(EchoEngine):
    """EchoEngine as the group's shared StreamingEngine: each step finishes the oldest queued request."""

    tensor_parallel_size = 2

    def __init__(self, eos: int, diverge_on: int | None = None) -> None:
        super().__init__(eos)
        self.queue: list[tuple[int, list[int]]] = []
        self.diverge_on = diverge_on  # this rank answers other tokens (a would-be vLLM bug)

    def add_request(self, key: int, prompt: list[int], params: GenerationParams) -> None:
        self.prompts.append([key, prompt])
        self.queue.append((key, prompt))

    def step(self) -> list[tuple[int, Generation]]:
        key, prompt = self.queue.pop(0)
        tokens = [49, 50, self.eos] if dist.get_rank() == self.diverge_on else [48 + len(prompt) % 10, self.eos]
        return [(key, Generation(tokens, None, "stop"))]

    def has_unfinished_requests(self) -> bool:
        return bool(self.queue)

    def abort_requests(self) -> None:
        self.queue.clear()


def outcome(fn) -> Any:
    try:
        return {"value": fn()}
    except Exception as exc:
        return {"error": type(exc).__name__, "message": str(exc), "notes": getattr(exc, "__notes__", []),
                "status": getattr(exc, "status", None)}


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    bad_tp = outcome(lambda: TPGroup.create(3))
    group = TPGroup.create(2)
    called: list[int] = []

    def leader_value() -> int:
        called.append(rank)
        return rank

    def raises(exc: Exception):
        def fn() -> None:
            raise exc
        return fn

    tokenizer = load_tokenizer()
    engine = EchoEngine(tokenizer.eos_token_id)
    tasks = group.group_share(["a", "bug", "c", "d"])
    trajs = run_episodes(engine, tokenizer, lambda: RankGym(max_turns=3), tasks, group_size=2,
                         params=GenerationParams(max_tokens=4), max_turns=3, tp_group=group)
    class DivergingEngine(EchoEngine):
        """The group's second rank samples other tokens for the first prompt (a would-be vLLM bug)."""

        def generate(self, prompts: list[list[int]], params: GenerationParams) -> list[Generation]:
            gens = super().generate(prompts, params)
            if group.member == 1:
                gens[0] = Generation([49, 50, self.eos], None, "stop")
            return gens

    def no_gym() -> Gym:
        raise ValueError("the gym factory failed")

    def play(engine: Any, factory: Any) -> Any:
        return run_episodes(engine, tokenizer, factory, tasks, group_size=2, params=GenerationParams(max_tokens=4),
                            max_turns=3, tp_group=group)

    streaming = StreamingEchoEngine(tokenizer.eos_token_id)
    streamed = run_episodes(streaming, tokenizer, lambda: RankGym(max_turns=3), tasks, group_size=2,
                            params=GenerationParams(max_tokens=4), max_turns=3, tp_group=group)
    result = {
        "diverged": outcome(lambda: play(DivergingEngine(tokenizer.eos_token_id), lambda: RankGym(max_turns=3))),
        "factory_error": outcome(lambda: play(EchoEngine(tokenizer.eos_token_id), no_gym)),
        "bad_tp": bad_tp,
        "group": [group.size, group.index, group.num_groups, group.member, group.is_leader, group.leader_rank],
        "shares": [group.group_share(list(range(8))), group.member_share(list(range(4)))],
        "value": group.from_leader(leader_value),
        "called": called,
        "user_error": outcome(lambda: group.from_leader(raises(UserSimulatorError("gone", status=503)))),
        "unpicklable_result": outcome(lambda: group.from_leader(lambda: (lambda: 0))),
        "unpicklable_error": outcome(lambda: group.from_leader(raises(Unpicklable(why="odd")))),
        "same": outcome(lambda: group.check_identical(["x", group.index])),
        "different": outcome(lambda: group.check_identical(["x", rank])),
        "checked": outcome(lambda: group.checked_from_leader(["x", group.index], lambda: rank)),
        "checked_different": outcome(lambda: group.checked_from_leader(["x", rank], lambda: rank)),
        "checked_error": outcome(lambda: group.checked_from_leader(["x"], raises(UserSimulatorError("gone")))),
        "streamed": [[t.task_id, t.input_ids, t.turn_choices, t.end_reason, t.messages] for t in streamed],
        "streamed_requests": streaming.prompts,
        "stream_diverged": outcome(lambda: len(play(StreamingEchoEngine(tokenizer.eos_token_id, diverge_on=1),
                                                    lambda: RankGym(max_turns=3)))),
        "prompts": engine.prompts,
        "trajectories": [[t.task_id, t.input_ids, t.turn_choices, t.end_reason, t.messages] for t in trajs],
        "gym_steps": RankGym.steps,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
