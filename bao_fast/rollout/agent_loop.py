"""Run many multi-turn episodes at once on one generation engine.

::

    trajs = run_episodes(engine, tokenizer, lambda: make_gym("function", max_turns=15), tasks,
                         group_size=8, params=GenerationParams(max_tokens=1024, stop_token_ids=(eos,)),
                         max_turns=15, max_model_len=8152, seeds=[...], env_workers=8)

Each episode's prompt is extended with the engine's output ids verbatim and the template ids of the gym's
feedback (``ChatFormat``): the conversation is never re-tokenised. Episodes of task ``i`` are ``group_size``
consecutive trajectories sharing ``group_id = i`` and the gym seed ``seeds[i]``; they differ only through
sampling. Gyms step in a thread pool of ``env_workers`` (LLM-simulated users are slow, programmatic ones cost
nothing). ``scheduling``:

* ``continuous`` (with a ``StreamingEngine``, e.g. vLLM; a tensor-parallel one only through its
  ``tp_group``): every episode's turn is its own engine request; as soon as it finishes, its gym steps and
  the episode's next turn joins the engine's running batch while the other episodes still generate. Neither
  the longest output of a round nor a slow user simulator holds up the episodes that are ready.
* ``rounds`` (any engine; the transformers engine always): one ``engine.generate`` call for the turns of all
  live episodes, then all their gym steps, then the next.

With ``params.seed`` set, turn ``t`` of episode ``e`` (of ``n``) samples with seed ``params.seed + t * n + e``
(in rounds: ``params.seed + t * n`` plus the request's index in the call, the same while all episodes are
live). Rounds with reproducible gyms rerun exactly; continuous scheduling samples the same way, but which
requests share an engine step depends on when the gyms answer, and an engine's numerics differ slightly with
its batch, so a rerun can differ in a token (use ``rounds`` for bit-exact reruns).

With a tensor-parallel engine (``tp_group`` of more than one rank, ``bao_fast.rollout.tp_group``) every rank
of the group calls ``run_episodes`` with the same arguments; only the group's leader resets and steps the gyms,
and the other ranks receive its results (opening messages, step results, the exceptions raised), so the
ranks submit the same requests in the same order even when the gym's replies are not reproducible (an LLM
user simulator), and the simulator sees each request once. Continuous scheduling exchanges one small gloo
message per engine step (the outputs' digest, the answers that are in).

End conditions (BAO.md), in the order they are checked after a turn:

* ``context_limit``: the generation was cut at ``max_model_len`` (prompt + output; the gym is not
  stepped, the cut turn is recorded with choice ``invalid`` and reward 0), or the next prompt would be
  longer than ``max_model_len - 1`` tokens (no room to generate; the turn itself was stepped);
* the gym's verdict: ``correct`` (terminated with success), ``finish``, ``no_tool_call``, ``terminated``;
  ``max_turns`` when the gym truncates or the episode has played ``max_turns`` turns.

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
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar, get_args

from transformers import PreTrainedTokenizerBase

from bao_fast.config import Scheduling
from bao_fast.envs.base import Gym, StepResult
from bao_fast.envs.user_client import UserSimulatorError
from bao_fast.rollout.chat_format import ChatFormat
from bao_fast.rollout.engine import Generation, GenerationEngine, GenerationParams, StreamingEngine
from bao_fast.rollout.tp_group import TPGroup
from bao_fast.rollout.trajectory import EndReason, Trajectory

logger = logging.getLogger(__name__)

SCHEDULINGS: tuple[Scheduling, ...] = get_args(Scheduling)
T = TypeVar("T")


@dataclass
class _Episode:
    index: int  # in run_episodes' task-major order
    gym: Gym | None  # None on the ranks of a tensor-parallel group that do not step the gyms
    traj: Trajectory
    prompt: list[int]
    done: bool = False

    @property
    def turn(self) -> int:
        """Turns played so far."""
        return len(self.traj.turn_choices)

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


@dataclass(frozen=True)
class _Rules:
    """What every turn of every episode is played by."""

    tokenizer: PreTrainedTokenizerBase
    fmt: ChatFormat
    params: GenerationParams
    limit: int  # max_model_len
    max_turns: int
    num_episodes: int

    def turn_params(self, turn: int, index: int = 0) -> GenerationParams:
        """``params`` of turn ``turn`` of episode ``index``: seed ``params.seed + turn * num_episodes + index``
        (a round's call passes index 0: the engine adds each request's index in the call)."""
        if self.params.seed is None:
            return self.params
        return replace(self.params, seed=self.params.seed + turn * self.num_episodes + index)

    def take_output(self, ep: _Episode, raw: Generation) -> tuple[Generation, str] | None:
        """Record the engine's output for ``ep``'s turn; ``(output, text)`` for the gym, or None when the context
        cut it (the episode then ends: the gym never sees a turn the context cut off)."""
        gen, cut = _fit_to_context(raw, self.limit - len(ep.prompt), self.params.max_tokens)
        text = self.tokenizer.decode(gen.token_ids, skip_special_tokens=True)
        ep.record_output(gen, text)
        if cut:
            ep.record_turn("invalid", 0.0, False)
            ep.finish("context_limit")
            return None
        return gen, text

    def take_result(self, ep: _Episode, gen: Generation, result: StepResult | RuntimeError) -> bool:
        """Record the gym's answer to ``ep``'s turn ``gen``; True when the episode goes on (its prompt then
        holds the next turn's)."""
        if isinstance(result, Exception):
            ep.record_turn("invalid", 0.0, False)
            ep.finish("gym_error")
            return False
        info = result.info
        ep.record_turn(str(info.get("choice", "invalid")), float(result.reward), bool(info.get("user_involved", False)))
        ep.traj.success = bool(info.get("success", False))
        ep.traj.messages.append({"role": "user", "content": result.feedback})
        reason = end_reason_of(result)
        if reason is None and ep.turn == self.max_turns:
            reason = "max_turns"
        if reason is None:
            ended_with_eos = bool(gen.token_ids) and gen.token_ids[-1] == self.tokenizer.eos_token_id
            feedback = self.fmt.feedback_ids(result.feedback, ended_with_eos)
            if len(ep.prompt) + len(gen.token_ids) + len(feedback) > self.limit - 1:
                reason = "context_limit"
            else:
                ep.traj.segments.append(("user", feedback))
                ep.prompt = ep.prompt + list(gen.token_ids) + feedback
        if reason is not None:
            ep.finish(reason)
        return reason is None


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
    scheduling: Scheduling = "continuous",
) -> list[Trajectory]:
    """Play ``group_size`` episodes of every task; returns ``len(tasks) * group_size`` trajectories,
    task-major. ``max_model_len`` defaults to (and may not exceed) ``engine.max_model_len``; a task's
    opening prompt longer than ``max_model_len - 1`` raises ValueError. ``tp_group``: the tensor-parallel
    group sharing ``engine`` (module docstring); None or a group of one: this rank steps its own gyms.
    ``scheduling``: ``continuous`` or ``rounds`` (module docstring)."""
    _check_args(tasks, group_size, max_turns, env_workers, seeds)
    if scheduling not in SCHEDULINGS:
        raise ValueError(f"scheduling must be one of {SCHEDULINGS}, got {scheduling!r}")
    limit = engine.max_model_len if max_model_len is None else max_model_len
    if limit > engine.max_model_len:
        raise ValueError(f"max_model_len {limit} exceeds the engine's max_model_len {engine.max_model_len}")
    fmt = ChatFormat.from_tokenizer(tokenizer)
    group = tp_group if tp_group is not None and tp_group.size > 1 else None  # None: this rank's own gyms
    lead = _on_leader(group)
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
        episodes.append(_Episode(len(episodes), gym, traj, prompt))

    rules = _Rules(tokenizer, fmt, params, limit, max_turns, len(episodes))
    with ThreadPoolExecutor(max_workers=env_workers) as pool:
        if scheduling == "continuous" and _streams(engine, group):
            _play_continuously(engine, episodes, rules, pool, group)
        else:
            _play_in_rounds(engine, episodes, rules, pool, group)
    return [ep.traj for ep in episodes]


def _on_leader(tp_group: TPGroup | None) -> Callable[[Callable[[], T]], T]:
    """``tp_group.from_leader``: run a function on the group's leader, every rank gets its result; without a
    group, just call it."""
    return tp_group.from_leader if tp_group is not None else (lambda fn: fn())


def _streams(engine: GenerationEngine, tp_group: TPGroup | None) -> bool:
    """Whether ``engine`` can take this rank's requests one at a time: a ``StreamingEngine`` of its own, or one
    shared by exactly ``tp_group``'s ranks (whose leader then orders the requests)."""
    shared_by = tp_group.size if tp_group is not None else 1
    return isinstance(engine, StreamingEngine) and engine.tensor_parallel_size == shared_by


def _play_in_rounds(
    engine: GenerationEngine, episodes: list[_Episode], rules: _Rules, pool: ThreadPoolExecutor,
    tp_group: TPGroup | None,
) -> None:
    """Every round: one ``generate`` call for all live episodes, then all their gym steps (in a group: on the
    leader, its results shared with the group in the gather that checks the ranks' outputs agree, so that a
    diverging rank fails this round instead of desynchronising the next one)."""
    while live := [ep for ep in episodes if not ep.done]:
        gens = engine.generate([ep.prompt for ep in live], rules.turn_params(live[0].turn))
        stepping = [(ep, *out) for ep, raw in zip(live, gens) if (out := rules.take_output(ep, raw)) is not None]
        step_gyms = partial(_step_all, pool, stepping)
        if tp_group is None:
            results = step_gyms()
        else:
            results = tp_group.checked_from_leader([g.token_ids for g in gens], step_gyms)
        for (ep, gen, _), result in zip(stepping, results):
            rules.take_result(ep, gen, result)


def _play_continuously(
    engine: StreamingEngine, episodes: list[_Episode], rules: _Rules, pool: ThreadPoolExecutor,
    tp_group: TPGroup | None,
) -> None:
    """Each episode's next turn is queued as soon as its gym step returns, while the engine keeps generating
    the others'; if anything raises, the gym steps not started are cancelled and the unfinished requests
    dropped. In a tensor-parallel group the leader steps the gyms; after every engine step one gather checks
    that the ranks' outputs agree (a diverging rank fails the group at once instead of desynchronising it) and
    hands every rank the answers that are in, so that all add the same requests in the same order."""
    steps: dict[int, Future] = {}  # the gym steps in flight (on the leader), by episode
    waiting: dict[int, Generation] = {}  # every rank: the episodes waiting on their gym, and their outputs

    def queue(ep: _Episode) -> None:
        engine.add_request(ep.index, ep.prompt, rules.turn_params(ep.turn, ep.index))

    def answers(block: bool) -> list[tuple[int, StepResult | RuntimeError]]:
        """The gym answers that are in (at least one when ``block``), in episode order."""
        if block:
            wait(steps.values(), return_when=FIRST_COMPLETED)
        return [(i, steps.pop(i).result()) for i in sorted(i for i, f in steps.items() if f.done())]

    try:
        for ep in episodes:
            queue(ep)
        while engine.has_unfinished_requests() or waiting:
            generating = engine.has_unfinished_requests()
            outputs = engine.step() if generating else []
            for index, raw in outputs:
                ep = episodes[index]
                if (out := rules.take_output(ep, raw)) is not None:
                    waiting[index] = out[0]
                    if ep.gym is not None:  # the leader's (or a lone rank's) gyms
                        steps[index] = pool.submit(step_gym, ep.gym, ep.traj.task_id, out[1])
            collect = partial(answers, not generating) if waiting else list
            if tp_group is None:
                ready = collect()
            else:
                ready = tp_group.checked_from_leader([(i, g.token_ids) for i, g in outputs], collect)
            for index, result in ready:
                if rules.take_result(episodes[index], waiting.pop(index), result):
                    queue(episodes[index])
    except BaseException:
        for future in steps.values():
            future.cancel()
        engine.abort_requests()
        raise
