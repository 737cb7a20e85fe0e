"""Run many multi-turn episodes at once on one generation engine.

::

    trajs = run_episodes(engine, tokenizer, lambda: make_gym("function", max_turns=15), tasks,
                         group_size=8, params=GenerationParams(max_tokens=1024, stop_token_ids=(eos,)),
                         max_turns=15, max_model_len=8152, seeds=[...], env_workers=8)

Each round submits the prompts of all live episodes in one ``engine.generate`` call (the engine batches
them continuously), then steps the gyms in a thread pool (LLM-simulated users are slow, programmatic ones
cost nothing), then extends each prompt with the engine's output ids verbatim and the template ids of
the feedback (``ChatFormat``). The conversation is never re-tokenised. Episodes of task ``i`` are
``group_size`` consecutive trajectories sharing ``group_id = i`` and the gym seed ``seeds[i]``; they differ
only through sampling. With ``params.seed`` set, round ``t`` uses ``params.seed + t * num_episodes`` (the
engines add the request index), so a run is reproducible.

With a tensor-parallel engine (``tp_group`` of more than one rank, ``bao_fast.rollout.tp_group``) every rank
of the group calls ``run_episodes`` with the same arguments; only the group's leader resets and steps the gyms,
and the other ranks receive its results (opening messages, step results, the exceptions raised), so the
prompts of every round are the same on all ranks even when the gym's replies are not reproducible (an LLM
user simulator), and the simulator sees each request once.

End conditions (BAO.md), in the order they are checked after a turn:

* ``context_limit``: the generation was cut at ``max_model_len`` (prompt + output; the gym is not
  stepped, the cut turn is recorded with choice ``invalid`` and reward 0), or the next prompt would be
  longer than ``max_model_len - 1`` tokens (no room to generate; the turn itself was stepped);
* the gym's verdict: ``correct`` (terminated with success), ``finish``, ``no_tool_call``, ``terminated``;
  ``max_turns`` when the gym truncates or ``max_turns`` rounds are done.

Malformed outputs are the gym's business: it answers with an error message and the episode continues.
A generation that stops at ``max_tokens`` without a tool call is stepped like any other turn. Should a gym
raise all the same (a gym bug some output triggers), only that episode ends: the turn is recorded as
``invalid`` with reward 0, end reason ``gym_error``, and the error is logged with its traceback. A
``UserSimulatorError`` (the user simulator is unreachable for good) still stops the rollout: it concerns every
episode, and training on its outcomes would teach the policy nothing about the task. Neither does a gym
that cannot ``reset`` a task: the error propagates with a note naming the gym, the task and the seed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from transformers import PreTrainedTokenizerBase

from bao_fast.envs.base import Gym, StepResult
from bao_fast.envs.user_client import UserSimulatorError
from bao_fast.rollout.chat_format import ChatFormat
from bao_fast.rollout.engine import Generation, GenerationEngine, GenerationParams
from bao_fast.rollout.tp_group import TPGroup
from bao_fast.rollout.trajectory import EndReason, Trajectory

logger = logging.getLogger(__name__)


@dataclass
class _Episode:
    gym: Gym | None  # None on the ranks of a tensor-parallel group that do not step the gyms
    traj: Trajectory
    prompt: list[int]
    done: bool = False

    def finish(self, reason: EndReason) -> None:
        self.traj.end_reason = reason
        self.done = True

    def record_output(self, gen: Generation, text: str) -> None:
        """Append the engine's output as an assistant segment (and its log-probs and text)."""
        traj = self.traj
        traj.segments.append(("assistant", list(gen.token_ids)))
        if gen.logprobs is None:
            traj.engine_logprobs = None
        elif traj.engine_logprobs is not None:
            traj.engine_logprobs.extend(gen.logprobs)
        traj.messages.append({"role": "assistant", "content": text})

    def record_turn(self, choice: str, reward: float, is_answer: bool) -> None:
        self.traj.turn_choices.append(choice)
        self.traj.turn_rewards.append(reward)
        self.traj.turn_is_answer.append(is_answer)


def step_gym(gym: Gym, task_id: str, text: str) -> StepResult | RuntimeError:
    """``gym.step(text)``, or (logged) the type and message of the exception a gym bug raised, as a picklable
    RuntimeError; a ``UserSimulatorError`` propagates."""
    try:
        return gym.step(text)
    except UserSimulatorError:
        raise
    except Exception as exc:
        logger.warning("gym %s raised on task %s; the episode ends (gym_error)", type(gym).__name__, task_id,
                       exc_info=exc)
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _step_all(
    pool: ThreadPoolExecutor, stepping: list[tuple[_Episode, Generation, str]]
) -> list[StepResult | RuntimeError]:
    """Step the gym of every ``(episode, generation, text)`` with its text, in ``pool``; results in order."""
    return list(pool.map(lambda item: step_gym(item[0].gym, item[0].traj.task_id, item[2]), stepping))


def reset_gym(gym: Gym, task: Any, seed: int | None, index: int) -> list[dict[str, str]]:
    """``gym.reset(task, seed)``; an exception gets a note naming the gym and the task and propagates (a task
    the gym cannot start is a data or gym bug that every episode of the task would hit)."""
    try:
        return gym.reset(task, seed)
    except Exception as exc:
        exc.add_note(f"raised by {type(gym).__name__}.reset on task {getattr(task, 'id', index)!r} (task index "
                     f"{index}, seed {seed})")
        raise


def end_reason_of(result: StepResult) -> EndReason | None:
    """Why the gym ended the episode on this step, or None if it goes on."""
    if result.terminated:
        if result.info.get("success"):
            return "correct"
        if result.info.get("choice") == "finish":
            return "finish"
        if result.info.get("choice") == "invalid":
            return "no_tool_call"
        return "terminated"
    return "max_turns" if result.truncated else None


def _fit_to_context(gen: Generation, room: int, max_tokens: int) -> tuple[Generation, bool]:
    """``gen`` cut to ``room`` tokens, and whether the context cut it (then the episode ends there). Output
    that fills the room exactly is whole when it stopped on its own or at the turn limit ``max_tokens``."""
    n = len(gen.token_ids)
    if n < room or (n == room and (gen.finish_reason == "stop" or n == max_tokens)):
        return gen, False
    lps = None if gen.logprobs is None else gen.logprobs[:room]
    return Generation(gen.token_ids[:room], lps, "length"), True


def _check_args(tasks: Sequence[Any], group_size: int, max_turns: int, env_workers: int, seeds: Sequence[int] | None):
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    if env_workers < 1:
        raise ValueError(f"env_workers must be >= 1, got {env_workers}")
    if seeds is not None and len(seeds) != len(tasks):
        raise ValueError(f"seeds must hold one seed per task ({len(tasks)}), got {len(seeds)}")


def run_episodes(
    engine: GenerationEngine,
    tokenizer: PreTrainedTokenizerBase,
    gym_factory: Callable[[], Gym],
    tasks: Sequence[Any],
    *,
    group_size: int = 1,
    params: GenerationParams,
    max_turns: int,
    max_model_len: int | None = None,
    seeds: Sequence[int] | None = None,
    env_workers: int = 8,
    tp_group: TPGroup | None = None,
) -> list[Trajectory]:
    """Play ``group_size`` episodes of every task; returns ``len(tasks) * group_size`` trajectories,
    task-major. ``max_model_len`` defaults to (and may not exceed) ``engine.max_model_len``; a task's
    opening prompt longer than ``max_model_len - 1`` raises ValueError. ``tp_group``: the tensor-parallel
    group sharing ``engine`` (module docstring); None or a group of one: this rank steps its own gyms."""
    _check_args(tasks, group_size, max_turns, env_workers, seeds)
    limit = engine.max_model_len if max_model_len is None else max_model_len
    if limit > engine.max_model_len:
        raise ValueError(f"max_model_len {limit} exceeds the engine's max_model_len {engine.max_model_len}")
    fmt = ChatFormat.from_tokenizer(tokenizer)
    lead = tp_group.from_leader if tp_group is not None else (lambda fn: fn())
    seed_of = [None if seeds is None else int(seeds[i]) for i in range(len(tasks))]
    slots = [i for i in range(len(tasks)) for _ in range(group_size)]  # episode -> task index
    gyms: list[Gym | None] = [None] * len(slots)

    def open_episodes() -> list[list[dict[str, str]]]:  # the leader's gyms; their errors reach the whole group
        gyms[:] = [gym_factory() for _ in slots]
        return [reset_gym(gym, tasks[i], seed_of[i], i) for gym, i in zip(gyms, slots)]

    openings = lead(open_episodes)
    episodes: list[_Episode] = []
    encoded: dict[tuple, list[int]] = {}  # a group's episodes usually open alike: each opening encoded once
    for gym, i, messages in zip(gyms, slots, openings):
        key = tuple(tuple(sorted(m.items())) for m in messages)
        if key not in encoded:
            encoded[key] = fmt.prompt_ids(messages)
        prompt = list(encoded[key])
        if len(prompt) > limit - 1:
            raise ValueError(f"task {i}: opening prompt has {len(prompt)} tokens, max_model_len is {limit}")
        traj = Trajectory(str(getattr(tasks[i], "id", i)), i, seed_of[i], [("user", prompt)], messages=list(messages))
        episodes.append(_Episode(gym, traj, prompt))

    with ThreadPoolExecutor(max_workers=env_workers) as pool:
        for turn in range(max_turns):
            live = [ep for ep in episodes if not ep.done]
            if not live:
                break
            turn_params = params if params.seed is None else replace(params, seed=params.seed + turn * len(episodes))
            gens = engine.generate([ep.prompt for ep in live], turn_params)
            if tp_group is not None:  # a diverging rank must fail this round, not desynchronise the next one
                tp_group.check_identical([g.token_ids for g in gens])
            stepping: list[tuple[_Episode, Generation, str]] = []
            for ep, raw in zip(live, gens):
                gen, cut = _fit_to_context(raw, limit - len(ep.prompt), turn_params.max_tokens)
                text = tokenizer.decode(gen.token_ids, skip_special_tokens=True)
                ep.record_output(gen, text)
                if cut:  # the gym never sees a turn the context cut off
                    ep.record_turn("invalid", 0.0, False)
                    ep.finish("context_limit")
                else:
                    stepping.append((ep, gen, text))
            results = lead(partial(_step_all, pool, stepping))
            for (ep, gen, _), result in zip(stepping, results):
                if isinstance(result, Exception):
                    ep.record_turn("invalid", 0.0, False)
                    ep.finish("gym_error")
                    continue
                ep.record_turn(
                    str(result.info.get("choice", "invalid")),
                    float(result.reward),
                    bool(result.info.get("user_involved", False)),
                )
                ep.traj.success = bool(result.info.get("success", False))
                ep.traj.messages.append({"role": "user", "content": result.feedback})
                reason = end_reason_of(result)
                if reason is None and turn == max_turns - 1:
                    reason = "max_turns"
                if reason is None:
                    ended_with_eos = bool(gen.token_ids) and gen.token_ids[-1] == tokenizer.eos_token_id
                    feedback = fmt.feedback_ids(result.feedback, ended_with_eos)
                    if len(ep.prompt) + len(gen.token_ids) + len(feedback) > limit - 1:
                        reason = "context_limit"
                    else:
                        ep.traj.segments.append(("user", feedback))
                        ep.prompt = ep.prompt + list(gen.token_ids) + feedback
                if reason is not None:
                    ep.finish(reason)
    return [ep.traj for ep in episodes]
