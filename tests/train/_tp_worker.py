"""Worker for ``test_rl_tensor_parallel.py`` (plain process or ``torchrun``; not collected by pytest).

Builds the RL setup of the config from argv[1] (JSON list of dotted overrides) with the colocated vLLM engine,
then runs one greedy evaluation and one RL step, recording on every rank: the prompts submitted to
``generate`` or ``add_request`` (in order), the trajectories each rollout returned, the ``(task_id, group_id)`` of the
trajectories the rank trained on, how many times its gyms were stepped, the step's metrics and the eval
summary. Rank 0 writes ``{"ranks": [...]}`` to argv[2].

The gym ("rankecho", two turns) answers with text naming the rank that stepped it: a stand-in for an LLM user
simulator whose replies differ between ranks. Only the tensor-parallel leader may step the gyms, or the ranks
of a group would submit different prompts in the second round.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch.distributed as dist

from bao_fast.config import load_config
from bao_fast.envs import GYMS, TASKS
from bao_fast.envs.base import Gym, StepResult, ToolCall
from bao_fast.models import load_tokenizer
from bao_fast.rollout import Trajectory
from bao_fast.train import rl
from bao_fast.train.collectives import gather_objects
from bao_fast.train.fsdp import shutdown_distributed
from bao_fast.train.logging import NonFiniteGuard
from bao_fast.train.runtime import TaskSampler, derive_seed, initial_model, start_run

GYM_STEPS = 0


class RankEchoGym(Gym):
    """Reward 1 when the reply has an even number of characters; the feedback names the stepping rank."""

    name = "rankecho"

    def _reset(self, task: Any) -> list[dict[str, str]]:
        return [{"role": "system", "content": "Reply."}, {"role": "user", "content": f"Task {task}: say something."}]

    def _act(self, call: ToolCall) -> Any:  # every turn goes through step()
        raise AssertionError("unreachable")

    def step(self, action_text: str) -> StepResult:
        global GYM_STEPS
        GYM_STEPS += 1
        self._turn += 1
        truncated = self._turn >= self.max_turns
        self._done = truncated
        reward = float(len(action_text) % 2 == 0)
        self._success = self._success or reward > 0
        choice = "answer" if self._turn % 2 == 0 else "action"
        info = {"choice": choice, "content": action_text, "user_involved": choice == "answer",
                "success": self._success, "turn": self._turn, "error": None}
        return StepResult(f"Rank {dist.get_rank()} heard {len(action_text)} chars.\nReward: {reward}", reward,
                          False, truncated, info)


def rankecho_tasks(split: str, n: int | None, level: Any, seed: int, path: str | None) -> list[str]:
    return [f"{split}-{i}" for i in range(n or 8)]


def ids(trajs: list[Trajectory]) -> list[dict[str, Any]]:
    return [{"task": t.task_id, "tokens": t.input_ids, "rewards": t.turn_rewards, "messages": t.messages}
            for t in trajs]


def main() -> None:
    GYMS["rankecho"] = RankEchoGym
    TASKS["rankecho"] = rankecho_tasks
    cfg = load_config(None, json.loads(sys.argv[1]))
    env = start_run(cfg, "train")
    model_path = initial_model(cfg, env)
    s = rl.setup(cfg, env, model_path, load_tokenizer(model_path))

    prompts: list[list[list[int]]] = []
    generate = s.engine.generate
    s.engine.generate = lambda batch, params: prompts.append(batch) or generate(batch, params)
    requests: list[tuple[int, list[int]]] = []  # continuous scheduling: (episode, prompt) in the order added
    add_request = s.engine.add_request
    s.engine.add_request = lambda key, prompt, params: requests.append((key, prompt)) or add_request(key, prompt,
                                                                                                    params)
    rollouts: list[list[dict[str, Any]]] = []
    rollout = rl.rollout

    def recording_rollout(*args: Any, **kwargs: Any) -> list[Trajectory]:
        trajs = rollout(*args, **kwargs)
        rollouts.append(ids(trajs))
        return trajs

    trained: list[tuple[str, int]] = []
    group_ids = rl.advantage_group_ids

    def recording_group_ids(trajs: list[Trajectory]) -> list[int]:
        trained.extend((t.task_id, t.group_id) for t in trajs)
        return group_ids(trajs)

    rl.rollout, rl.advantage_group_ids = recording_rollout, recording_group_ids
    state = rl.RLState(1, TaskSampler(len(s.train_tasks), derive_seed(cfg.seed, 9)),
                       NonFiniteGuard(cfg.train.max_nonfinite_steps))
    summary = rl.evaluate(s, 0)
    metrics = rl.rl_step(s, state)
    result = {"rank": env.rank, "tp_index": s.tp_group.index, "prompts": prompts, "requests": requests,
              "rollouts": rollouts,
              "trained": trained, "gym_steps": GYM_STEPS, "metrics": metrics, "eval": summary}
    ranks = gather_objects(result)
    if env.is_main:
        with open(sys.argv[2], "w") as f:
            json.dump({"ranks": ranks}, f)
    dist.barrier()
    shutdown_distributed()


if __name__ == "__main__":
    main()
