"""run_episodes: multi-turn Function-gym episodes with a scripted engine (end conditions, malformed
outputs, exact token bookkeeping against a fresh tokenisation) and with the real tiny model (trained
tokens are exactly the engine's outputs, prompts are the concatenated segments, log-probs aligned)."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable

import pytest
import torch

from bao_fast.config import RolloutConfig
from bao_fast.data.segments import pack_segments
from bao_fast.envs import generate_tasks, make_gym
from bao_fast.rollout import (
    END_REASONS,
    ChatFormat,
    Generation,
    GenerationParams,
    HFEngine,
    TPGroup,
    Trajectory,
    run_episodes,
)

from ._helpers import EndlessGym

MAX_LEN = 2048
_TEST_CASE = re.compile(r"The test case is \((-?\d+), (-?\d+), (-?\d+), (-?\d+)\)")


class ScriptedEngine:
    """The part of a GenerationEngine that run_episodes uses: outputs are the canonical tokenisation of
    ``policy(conversation text)`` plus eos, clamped to ``max_model_len`` like a real engine; logs calls (and
    every output, in the order they finished, in ``outputs``)."""

    def __init__(self, tokenizer, policy: Callable[[str], str], max_model_len: int = MAX_LEN):
        self.tokenizer, self.policy, self.max_model_len = tokenizer, policy, max_model_len
        self.calls: list[tuple[list[list[int]], list[Generation]]] = []
        self.outputs: list[Generation] = []

    def generate(self, prompts: list[list[int]], params: GenerationParams) -> list[Generation]:
        gens = [self._continue(prompt, params) for prompt in prompts]
        self.calls.append((prompts, gens))
        return gens

    def _continue(self, prompt: list[int], params: GenerationParams) -> Generation:
        text = self.policy(self.tokenizer.decode(prompt))
        ids = [*self.tokenizer.encode(text, add_special_tokens=False), self.tokenizer.eos_token_id]
        room = min(params.max_tokens, self.max_model_len - len(prompt))
        finish = "stop" if len(ids) <= room else "length"
        ids = ids[:room]
        gen = Generation(ids, [-0.01 * (k + 1) for k in range(len(ids))], finish)
        self.outputs.append(gen)
        return gen


class StreamingScriptedEngine(ScriptedEngine):
    """ScriptedEngine as a StreamingEngine too: each ``step`` finishes the newest queued request (so episodes
    run out of step); logs ``requests`` as (key, prompt, params, generation) in finishing order."""

    def __init__(self, tokenizer, policy: Callable[[str], str], max_model_len: int = MAX_LEN, tensor_parallel_size=1):
        super().__init__(tokenizer, policy, max_model_len)
        self.tensor_parallel_size = tensor_parallel_size
        self.queue: list[tuple[int, list[int], GenerationParams]] = []
        self.requests: list[tuple[int, list[int], GenerationParams, Generation]] = []
        self.aborted: list[list[int]] = []  # the keys dropped by each abort_requests call

    def add_request(self, key: int, prompt: list[int], params: GenerationParams) -> None:
        assert key not in [k for k, _, _ in self.queue]
        self.queue.append((key, list(prompt), params))

    def step(self) -> list[tuple[int, Generation]]:
        key, prompt, params = self.queue.pop()
        gen = self._continue(prompt, params)
        self.requests.append((key, prompt, params, gen))
        return [(key, gen)]

    def has_unfinished_requests(self) -> bool:
        return bool(self.queue)

    def abort_requests(self) -> None:
        self.aborted.append([k for k, _, _ in self.queue])
        self.queue.clear()


@pytest.fixture(params=["rounds", "continuous"])
def scheduling(request) -> str:
    return request.param


class RecordingEngine:
    """Wraps a real engine and logs its calls."""

    def __init__(self, inner):
        self.inner, self.max_model_len, self.calls = inner, inner.max_model_len, []

    def generate(self, prompts, params):
        gens = self.inner.generate(prompts, params)
        self.calls.append((prompts, gens))
        return gens


def solver(conversation: str) -> str:
    """search -> malformed call -> action -> answer (right if the test case is one of TASKS')."""
    turn = conversation.count("<|im_start|>assistant") - 1
    if turn == 0:
        return "<think>I should look at the test case first.</think>\n[search] test"
    if turn == 1:
        return '<think>Probe.</think>\n<tool_call>{"name": "interact_with_env", "arguments": {"choice": </tool_call>'
    if turn == 2:
        return "<think>Probe again.</think>\n[action] 1 2 3 4"
    case = tuple(int(x) for x in _TEST_CASE.search(conversation).groups())
    return f"<think>I know it.</think>\n[answer] {ANSWERS[case]:g}"


TASKS = generate_tasks(3, 1, seed=0)
ANSWERS = {t.test_case: t.expected_result for t in TASKS}


def streams_match_prompts(trajs: list[Trajectory], calls) -> None:
    """Every prompt an episode submitted is its segments so far; every assistant segment is an output and
    the trajectory's log-probs are those outputs' log-probs, in order."""
    pos = {id(t): 0 for t in trajs}
    logprobs: dict[int, list[float]] = {id(t): [] for t in trajs}
    live = list(trajs)
    for prompts, gens in calls:
        assert len(prompts) == len(live)
        for traj, prompt, gen in zip(live, prompts, gens):
            k = pos[id(traj)]
            before = [tok for _, ids in traj.segments[: 2 * k + 1] for tok in ids]
            assert prompt == before
            role, ids = traj.segments[2 * k + 1]
            assert role == "assistant"
            assert ids == gen.token_ids[: len(ids)] and (
                len(ids) == len(gen.token_ids) or traj.end_reason == "context_limit"
            )
            logprobs[id(traj)] += gen.logprobs[: len(ids)]
            pos[id(traj)] = k + 1
        live = [t for t in live if pos[id(t)] < t.num_turns]
    assert not live and all(pos[id(t)] == t.num_turns for t in trajs)
    assert all(t.engine_logprobs == logprobs[id(t)] for t in trajs)


def requests_match_segments(trajs: list[Trajectory], requests) -> None:
    """Continuous scheduling: request ``k`` of episode ``e`` (key ``e``, in finishing order) prompted its
    segments so far with turn seed ``params.seed + k * len(trajs) + e``, and its output is assistant segment
    ``k``; the trajectory's log-probs are those outputs' log-probs, in order."""
    for e, traj in enumerate(trajs):
        mine = [(prompt, params, gen) for key, prompt, params, gen in requests if key == e]
        assert len(mine) == traj.num_turns
        logprobs = []
        for k, (prompt, params, gen) in enumerate(mine):
            assert prompt == [tok for _, ids in traj.segments[: 2 * k + 1] for tok in ids]
            assert params.seed == 0 + k * len(trajs) + e
            role, ids = traj.segments[2 * k + 1]
            assert role == "assistant" and ids == gen.token_ids[: len(ids)]
            logprobs += gen.logprobs[: len(ids)]
        assert traj.engine_logprobs == logprobs


def test_function_gym_multi_turn_bookkeeping(tokenizer, scheduling):
    engine = StreamingScriptedEngine(tokenizer, solver)
    params = GenerationParams(max_tokens=256, temperature=1.0, seed=0)
    gym = lambda: make_gym("function", max_turns=8)  # noqa: E731
    trajs = run_episodes(engine, tokenizer, gym, TASKS, group_size=2, params=params, max_turns=8, seeds=[3, 4, 5],
                         scheduling=scheduling)
    assert len(trajs) == 6
    assert [t.group_id for t in trajs] == [0, 0, 1, 1, 2, 2]
    assert [t.task_id for t in trajs] == [t.id for t in TASKS for _ in range(2)]
    assert [t.seed for t in trajs] == [3, 3, 4, 4, 5, 5]
    for traj in trajs:
        assert traj.end_reason == "correct" and traj.success
        assert traj.turn_choices == ["search", "invalid", "action", "answer"]
        assert traj.turn_rewards == [0.0, 0.0, 0.0, 1.0] and traj.reward == 1.0
        assert traj.turn_is_answer == [False, False, False, True]
        assert [r for r, _ in traj.segments] == ["user"] + ["assistant", "user"] * 3 + ["assistant"]
        assert len(traj.engine_logprobs) == len(traj.assistant_token_ids)
        assert "Invalid tool call" in traj.messages[5]["content"]  # malformed call -> gym feedback, goes on
        # The engine's outputs are canonical here and end in eos, so the stream is exactly what a fresh
        # tokenisation of the final conversation gives (the template's "\n" after the last eos aside).
        fresh = tokenizer.apply_chat_template(traj.messages[:-1], tokenize=True, return_dict=False)
        assert list(fresh) == traj.input_ids + tokenizer.encode("\n", add_special_tokens=False)
    if scheduling == "rounds":
        streams_match_prompts(trajs, engine.calls)
    else:
        assert engine.calls == []
        requests_match_segments(trajs, engine.requests)
    batch = pack_segments([t.segments for t in trajs])
    assert int(batch.loss_mask.sum()) == sum(len(t.assistant_token_ids) for t in trajs)
    assert batch.input_ids.tolist() == [tok for t in trajs for tok in t.input_ids]
    assert batch.num_turns == sum(t.num_turns for t in trajs)


@pytest.mark.parametrize(
    ("text", "reason", "choice"),
    [
        ("<think>done</think>\n[finish]", "finish", "finish"),
        ("I will not use the tool.", "no_tool_call", "invalid"),
        ("<think>guess</think>\n[answer] 123456789", "max_turns", "answer"),
    ],
)
def test_end_conditions(tokenizer, text, reason, choice, scheduling):
    engine = StreamingScriptedEngine(tokenizer, lambda _: text)
    params = GenerationParams(max_tokens=64, temperature=0.0)
    gym = lambda: make_gym("function", max_turns=3)  # noqa: E731
    (traj,) = run_episodes(engine, tokenizer, gym, TASKS[:1], params=params, max_turns=5, scheduling=scheduling)
    assert traj.end_reason == reason and not traj.success
    assert traj.turn_choices == [choice] * traj.num_turns
    assert traj.num_turns == (3 if reason == "max_turns" else 1)
    assert traj.turn_is_answer == [choice == "answer"] * traj.num_turns
    assert traj.segments[-1][0] == "assistant"


def test_max_turns_argument_caps_episodes(tokenizer, scheduling):
    engine = StreamingScriptedEngine(tokenizer, lambda _: "<think>x</think>\n[action] 1 1 1 1")
    gym = lambda: make_gym("function", max_turns=15)  # noqa: E731
    (traj,) = run_episodes(engine, tokenizer, gym, TASKS[:1], params=GenerationParams(max_tokens=32), max_turns=2,
                           scheduling=scheduling)
    assert traj.end_reason == "max_turns" and traj.num_turns == 2


def test_context_limit_cuts_generation(tokenizer, scheduling):
    fmt = ChatFormat.from_tokenizer(tokenizer)
    opening = len(fmt.prompt_ids(make_gym("function").reset(TASKS[0], 0)))
    limit = opening + 40
    long_text = "<think>" + "very long reasoning " * 50 + "</think>\n[action] 1 2 3 4"
    engine = StreamingScriptedEngine(tokenizer, lambda _: long_text, max_model_len=limit)
    gym = lambda: make_gym("function")  # noqa: E731
    (traj,) = run_episodes(engine, tokenizer, gym, TASKS[:1], params=GenerationParams(max_tokens=500), max_turns=5,
                           scheduling=scheduling)
    assert traj.end_reason == "context_limit"
    assert traj.num_turns == 1 and traj.turn_choices == ["invalid"] and traj.turn_rewards == [0.0]
    assert traj.num_tokens == limit and len(traj.engine_logprobs) == 40
    assert traj.assistant_token_ids == engine.outputs[0].token_ids


@pytest.mark.parametrize("spare", [0, 1])
def test_turn_limit_that_fills_the_context_is_still_stepped(tokenizer, spare, scheduling):
    """An output stopped at max_tokens is a whole turn even when the context's room equals max_tokens: the
    gym judges it (here a right answer), as it does with one token of room to spare."""
    fmt = ChatFormat.from_tokenizer(tokenizer)
    opening = len(fmt.prompt_ids(make_gym("function").reset(TASKS[0], 0)))
    text = f"[answer] {TASKS[0].expected_result:g}"
    max_tokens = len(tokenizer.encode(text, add_special_tokens=False))  # the eos after it is cut: "length"
    engine = StreamingScriptedEngine(tokenizer, lambda _: text, max_model_len=MAX_LEN)
    gym = lambda: make_gym("function")  # noqa: E731
    (traj,) = run_episodes(engine, tokenizer, gym, TASKS[:1], params=GenerationParams(max_tokens=max_tokens),
                           max_turns=5, max_model_len=opening + max_tokens + spare, scheduling=scheduling)
    assert engine.outputs[0].finish_reason == "length"
    assert (traj.end_reason, traj.turn_choices, traj.turn_rewards) == ("correct", ["answer"], [1.0])


def test_context_limit_on_next_prompt(tokenizer, scheduling):
    text = "<think>x</think>\n[action] 1 2 3 4"
    fmt = ChatFormat.from_tokenizer(tokenizer)
    opening = len(fmt.prompt_ids(make_gym("function").reset(TASKS[0], 0)))
    output = len(tokenizer.encode(text, add_special_tokens=False)) + 1
    limit = opening + output + 4  # the output fits, the feedback after it does not
    engine = StreamingScriptedEngine(tokenizer, lambda _: text, max_model_len=MAX_LEN)
    gym = lambda: make_gym("function")  # noqa: E731
    (traj,) = run_episodes(
        engine, tokenizer, gym, TASKS[:1], params=GenerationParams(max_tokens=64), max_turns=5, max_model_len=limit,
        scheduling=scheduling,
    )
    assert traj.end_reason == "context_limit" and traj.num_turns == 1 and traj.turn_choices == ["action"]
    assert [r for r, _ in traj.segments] == ["user", "assistant"]


def test_output_without_eos_is_closed_by_the_template(tokenizer, scheduling):
    engine = StreamingScriptedEngine(tokenizer, lambda _: "<think>" + "a b " * 40)
    gym = lambda: EndlessGym(max_turns=2)  # noqa: E731
    (traj,) = run_episodes(engine, tokenizer, gym, [0], params=GenerationParams(max_tokens=10), max_turns=2,
                           scheduling=scheduling)
    first = traj.segments[1][1]
    assert len(first) == 10 and tokenizer.eos_token_id not in first
    assert traj.segments[2][1][0] == tokenizer.eos_token_id  # the feedback wrapper closes the turn
    assert traj.end_reason == "max_turns"


def test_argument_validation(tokenizer):
    engine = ScriptedEngine(tokenizer, lambda _: "x")
    gym = lambda: make_gym("function")  # noqa: E731
    params = GenerationParams()
    with pytest.raises(ValueError, match="seeds"):
        run_episodes(engine, tokenizer, gym, TASKS, params=params, max_turns=2, seeds=[1])
    with pytest.raises(ValueError, match="group_size"):
        run_episodes(engine, tokenizer, gym, TASKS, params=params, max_turns=2, group_size=0)
    with pytest.raises(ValueError, match="max_model_len"):
        run_episodes(engine, tokenizer, gym, TASKS, params=params, max_turns=2, max_model_len=MAX_LEN + 1)
    with pytest.raises(ValueError, match="opening prompt"):
        run_episodes(engine, tokenizer, gym, TASKS, params=params, max_turns=2, max_model_len=32)
    with pytest.raises(ValueError, match="scheduling must be one of"):
        run_episodes(engine, tokenizer, gym, TASKS, params=params, max_turns=2, scheduling="async")


def test_real_model_tokens_are_exactly_the_engine_outputs(tiny_model_dir, tokenizer):
    inner = HFEngine.from_config(tiny_model_dir, RolloutConfig(max_model_len=100), device="cpu")
    engine = RecordingEngine(inner)
    params = GenerationParams(max_tokens=16, temperature=1.0, seed=1, stop_token_ids=(tokenizer.eos_token_id,))
    gym = lambda: EndlessGym(max_turns=4)  # noqa: E731
    trajs = run_episodes(engine, tokenizer, gym, [0, 1], group_size=2, params=params, max_turns=4, env_workers=2)
    assert {t.end_reason for t in trajs} <= set(END_REASONS)
    assert all(t.num_turns >= 2 for t in trajs)
    assert any(t.end_reason == "context_limit" for t in trajs)  # 100 tokens cannot hold 4 turns of 16
    streams_match_prompts(trajs, engine.calls)
    for traj in trajs:
        assert traj.num_tokens <= 100
        assert len(traj.engine_logprobs) == len(traj.assistant_token_ids)
    a, b = trajs[0], trajs[1]  # same task and gym seed, different samples
    assert a.group_id == b.group_id and a.segments[0] == b.segments[0] and a.segments[1] != b.segments[1]
    again = run_episodes(RecordingEngine(inner), tokenizer, gym, [0, 1], group_size=2, params=params, max_turns=4)
    assert [t.segments for t in again] == [t.segments for t in trajs]
    torch.testing.assert_close(torch.tensor(again[0].engine_logprobs), torch.tensor(trajs[0].engine_logprobs))


class _RaisesOnSecondStep:
    """A Function gym whose second step raises ``error`` (a gym bug, or the user simulator going away)."""

    def __init__(self, error: Exception):
        self.inner, self.error, self.steps = make_gym("function", max_turns=5), error, 0

    def reset(self, task, seed):
        return self.inner.reset(task, seed)

    def step(self, text):
        self.steps += 1
        if self.steps == 2:
            raise self.error
        return self.inner.step(text)


def test_a_gym_error_ends_only_its_episode(tokenizer, caplog, scheduling):
    engine = StreamingScriptedEngine(tokenizer, lambda _: "<think>x</think>\n[action] 1 1 1 1")
    gyms = iter([_RaisesOnSecondStep(ZeroDivisionError("gym bug")), make_gym("function", max_turns=5)])
    broken, healthy = run_episodes(engine, tokenizer, lambda: next(gyms), TASKS[:1], group_size=2,
                                   params=GenerationParams(max_tokens=32), max_turns=4, scheduling=scheduling)
    assert broken.end_reason == "gym_error" and "gym_error" in END_REASONS
    assert broken.turn_choices == ["action", "invalid"] and broken.turn_rewards == [0.0, 0.0]
    assert [role for role, _ in broken.segments] == ["user", "assistant", "user", "assistant"]
    assert healthy.end_reason == "max_turns" and healthy.num_turns == 4
    assert "ZeroDivisionError: gym bug" in caplog.text


def test_an_unreachable_user_simulator_stops_the_rollout(tokenizer, scheduling):
    from bao_fast.envs.user_client import UserSimulatorError

    engine = StreamingScriptedEngine(tokenizer, lambda _: "<think>x</think>\n[action] 1 1 1 1")
    with pytest.raises(UserSimulatorError, match="gone"):
        run_episodes(engine, tokenizer, lambda: _RaisesOnSecondStep(UserSimulatorError("gone")), TASKS[:1],
                     params=GenerationParams(max_tokens=32), max_turns=4, scheduling=scheduling)


class _CannotReset:
    """A gym whose ``reset`` raises on one task."""

    def __init__(self, bad_task):
        self.inner, self.bad_task = make_gym("function", max_turns=5), bad_task

    def reset(self, task, seed):
        if task is self.bad_task:
            raise KeyError("rule")
        return self.inner.reset(task, seed)


def test_a_gym_that_cannot_reset_a_task_names_the_task(tokenizer, scheduling):
    engine = StreamingScriptedEngine(tokenizer, lambda _: "[finish]")
    with pytest.raises(KeyError, match="rule") as info:
        run_episodes(engine, tokenizer, lambda: _CannotReset(TASKS[1]), TASKS[:2], seeds=[7, 8],
                     params=GenerationParams(max_tokens=32), max_turns=4, scheduling=scheduling)
    assert info.value.__notes__ == [f"raised by _CannotReset.reset on task {TASKS[1].id!r} (task index 1, seed 8)"]
    assert engine.outputs == []  # nothing was generated


def test_each_episode_starts_from_its_own_opening(tokenizer, scheduling) -> None:
    """Openings are encoded once per distinct text: a group whose gyms open differently (here every second
    gym) still gets each episode's own prompt, and episodes never share one prompt list."""
    opened = iter(range(100))

    class AlternatingGym(EndlessGym):
        def _reset(self, task):
            return [{"role": "user", "content": f"Task {task}, variant {next(opened) % 2}."}]

    engine = StreamingScriptedEngine(tokenizer, lambda text: "ok")
    trajs = run_episodes(engine, tokenizer, lambda: AlternatingGym(max_turns=1), ["a", "b"], group_size=3,
                         params=GenerationParams(max_tokens=8), max_turns=1, scheduling=scheduling)
    fmt = ChatFormat.from_tokenizer(tokenizer)
    prompts = [t.segments[0][1] for t in trajs]
    assert prompts == [fmt.prompt_ids(t.messages[:1]) for t in trajs]
    assert [t.messages[0]["content"].split(", ")[1] for t in trajs] == [f"variant {k % 2}." for k in range(6)]
    assert len({id(p) for p in prompts}) == 6


def test_an_error_drops_the_unfinished_requests(tokenizer):
    """Continuous scheduling: whatever raises mid-rollout, the requests still queued are aborted, so that the
    engine's next call does not finish them."""
    def policy(text):
        raise RuntimeError("engine died")

    engine = StreamingScriptedEngine(tokenizer, policy)
    with pytest.raises(RuntimeError, match="engine died"):
        run_episodes(engine, tokenizer, lambda: EndlessGym(max_turns=3), [0, 1, 2],
                     params=GenerationParams(max_tokens=8), max_turns=3, scheduling="continuous")
    assert engine.aborted == [[0, 1]] and not engine.has_unfinished_requests()  # episode 2's raised


@pytest.mark.parametrize(("scheduling", "released"), [("continuous", True), ("rounds", False)])
def test_a_slow_gym_holds_up_only_its_own_episode(tokenizer, scheduling, released):
    """Episode 0's first gym step waits until episode 1 has played all 3 turns. Continuous scheduling plays
    episode 1 meanwhile; rounds cannot (its round waits for episode 0's step, which gives up after 0.5 s)."""
    three_turns_done = threading.Event()
    waited: list[bool] = []

    class Gym(EndlessGym):
        def step(self, action_text):
            result = super().step(action_text)
            if self.task == 0 and self._turn == 1:
                waited.append(three_turns_done.wait(timeout=30 if released else 0.5))
            if self.task == 1 and self._turn == 3:
                three_turns_done.set()
            return result

    engine = StreamingScriptedEngine(tokenizer, lambda _: "ok")
    trajs = run_episodes(engine, tokenizer, lambda: Gym(max_turns=3), [0, 1], params=GenerationParams(max_tokens=8),
                         max_turns=3, env_workers=2, scheduling=scheduling)
    assert waited == [released]
    assert [t.num_turns for t in trajs] == [3, 3] and {t.end_reason for t in trajs} == {"max_turns"}


@pytest.mark.parametrize(("engine_tp", "group_size", "continuous"), [(2, 1, False), (1, 2, False), (2, 2, True)])
def test_continuous_only_where_the_engine_is_shared_by_exactly_the_group(tokenizer, engine_tp, group_size, continuous):
    """A tensor-parallel engine streams only through its own group (whose leader orders the requests); without
    it (bao-fast eval) or with another group it plays in rounds."""
    engine = StreamingScriptedEngine(tokenizer, lambda _: "ok", tensor_parallel_size=engine_tp)
    group = TPGroup(group_size, 0, 1, 0)  # no process group: the leader's own results, no collectives
    trajs = run_episodes(engine, tokenizer, lambda: EndlessGym(max_turns=2), [0, 1],
                         params=GenerationParams(max_tokens=4), max_turns=2, tp_group=group, scheduling="continuous")
    assert (len(engine.requests), [len(prompts) for prompts, _ in engine.calls]) == (
        (4, []) if continuous else (0, [2, 2]))
    assert [t.num_turns for t in trajs] == [2, 2]


def test_an_error_cancels_the_gym_steps_not_started(tokenizer):
    """A user simulator gone for good in one episode's step: the other episodes' steps still queued for the
    pool's one worker are cancelled, not run (each could wait minutes on a dead server) before the error."""
    from bao_fast.envs.user_client import UserSimulatorError

    started: list[int] = []

    class Gym(EndlessGym):
        def step(self, action_text):
            started.append(self.task)
            time.sleep(0.2)  # meanwhile the other episodes' turns finish and their steps queue up
            if self.task == 3:  # the newest request: its episode is stepped first
                raise UserSimulatorError("gone")
            return super().step(action_text)

    engine = StreamingScriptedEngine(tokenizer, lambda _: "ok")
    with pytest.raises(UserSimulatorError, match="gone"):
        run_episodes(engine, tokenizer, lambda: Gym(max_turns=2), [0, 1, 2, 3], params=GenerationParams(max_tokens=4),
                     max_turns=2, env_workers=1, scheduling="continuous")
    assert started[0] == 3 and len(started) <= 2  # (the worker takes the next step as episode 3's raises)
