"""Scripted Function teacher: solve rate per level, trajectory format, BAO behaviours in <think>, replay."""

from __future__ import annotations

import re

import numpy as np
import pytest

from bao_fast.envs import make_teacher
from bao_fast.envs.base import ToolCall, parse_tool_call
from bao_fast.envs.function import FunctionGym, FunctionTask, generate_tasks
from bao_fast.envs.teachers import FunctionTeacher, solve_rate
from bao_fast.envs.teachers.function_teacher import _split_scores

MIN_SOLVE_RATE = {1: 0.95, 2: 0.95, 3: 0.95, 4: 0.9, 5: 0.9}
TASKS_PER_LEVEL = 16


@pytest.fixture(scope="module")
def teacher() -> FunctionTeacher:
    return FunctionTeacher(max_turns=15, seed=0)


@pytest.mark.parametrize("level", sorted(MIN_SOLVE_RATE))
def test_solve_rate_per_level(teacher: FunctionTeacher, level: int) -> None:
    tasks = generate_tasks(TASKS_PER_LEVEL, level, seed=11, split="test")
    rate = solve_rate(teacher, tasks)
    print(f"level {level}: teacher solve rate {rate:.3f} on {len(tasks)} tasks")
    assert rate >= MIN_SOLVE_RATE[level]


def _assistant_calls(messages: list[dict[str, str]]) -> list[ToolCall]:
    calls = [parse_tool_call(m["content"]) for m in messages if m["role"] == "assistant"]
    assert all(isinstance(c, ToolCall) for c in calls)
    return calls  # type: ignore[return-value]


def test_trajectory_format_and_behaviours(teacher: FunctionTeacher) -> None:
    task = generate_tasks(1, 5, seed=2)[0]
    episode = teacher.play(task, seed=0)
    msgs = episode.messages
    assert episode.success and msgs[0]["role"] == "system" and msgs[1]["role"] == "user"
    roles = [m["role"] for m in msgs[2:]]
    assert roles == ["assistant", "user"] * episode.num_turns
    calls = _assistant_calls(msgs)
    assert calls[0] == ToolCall("search", "test") and calls[-1].choice == "answer"
    assert {c.choice for c in calls[1:-1]} <= {"action"} and msgs[-1]["content"].endswith("Reward: 1.0")
    assert float(calls[-1].content) == pytest.approx(task.expected_result, abs=1e-6)
    for turn, m in enumerate(msgs[2::2], start=1):
        think = re.fullmatch(r"<think>\n(.*)\n</think>\n<tool_call>.*</tool_call>", m["content"], re.DOTALL)
        assert think is not None, m["content"]
        body = think.group(1)
        assert f"Turn {turn} of 15." in body
        if turn > 1:  # retrospective: memory of observations and surviving hypotheses
            assert "What I know so far" in body and "consistent with every observation" in body
        assert re.search(r"\d+ turns? (left|available|remaining)|remaining turns|the \d+ turns", body)
    probes = [tuple(map(int, c.content.split())) for c in calls if c.choice == "action"]
    assert task.test_case not in probes and len(set(probes)) == len(probes)


def test_replay_reproduces_feedback_and_is_deterministic(teacher: FunctionTeacher) -> None:
    task = generate_tasks(1, 4, seed=5)[0]
    msgs = teacher.solve(task, seed=3)
    assert msgs == teacher.solve(task, seed=3)
    gym = FunctionGym(max_turns=15)
    assert gym.reset(task) == msgs[:2]
    for assistant, user in zip(msgs[2::2], msgs[3::2], strict=True):
        assert gym.step(assistant["content"]).feedback == user["content"]
    assert gym.done and gym.success


def test_unknown_rule_ends_with_finish_without_guessing(teacher: FunctionTeacher) -> None:
    task = FunctionTask("odd", "a ** 3 - b * c * d + 7", (2, 3, 4, 5), 2**3 - 3 * 4 * 5 + 7)
    episode = teacher.play(task)
    calls = _assistant_calls(episode.messages)
    assert not episode.success and calls[-1].choice == "finish"
    assert not any(c.choice == "answer" for c in calls)
    assert "No rule in my hypothesis space" in episode.messages[-2]["content"]


def test_tight_budget_still_answers(teacher: FunctionTeacher) -> None:
    tight = FunctionTeacher(max_turns=2)
    task = generate_tasks(1, 3, seed=9)[0]
    calls = _assistant_calls(tight.solve(task))
    assert [c.choice for c in calls] == ["search", "answer"]


def test_concise_style_solves_level_1_with_both_behaviours() -> None:
    concise, full = FunctionTeacher(max_turns=6, style="concise"), FunctionTeacher(max_turns=6)
    tasks = generate_tasks(TASKS_PER_LEVEL, 1, seed=13, split="test")
    episodes = [concise.play(task, seed=i) for i, task in enumerate(tasks)]
    assert sum(e.success for e in episodes) / len(tasks) >= MIN_SOLVE_RATE[1]
    for i, (task, episode) in enumerate(zip(tasks, episodes, strict=True)):
        calls = _assistant_calls(episode.messages)
        assert calls == _assistant_calls(full.solve(task, seed=i))  # same decisions, shorter narration
        for turn, m in enumerate(episode.messages[2::2], start=1):
            think = re.fullmatch(r"<think>\n(.*)\n</think>\n<tool_call>.*</tool_call>", m["content"], re.DOTALL)
            assert think is not None, m["content"]
            known, plan = think.group(1).split("\n")
            assert re.fullmatch(r"Known: .+; (\d+ rules? fits?(, \d+ answers? possible)?|no rule fits)\.", known)
            assert re.fullmatch(r"Plan: (\d+ turns left|last turn): .+\.", plan)
            assert f"{6 - turn + 1} turns left" in plan if turn < 6 else "last turn" in plan
            assert len(think.group(1)) < 200
        assert "Known: nothing yet" in episode.messages[2]["content"]
        if episode.num_turns > 1:  # the search result is remembered in the next turn
            assert f"the test case is {task.test_case}" in episode.messages[4]["content"]
        if episode.success:
            assert f"answer {calls[-1].content} now" in episode.messages[-2]["content"]


def test_registry_and_argument_checks() -> None:
    assert isinstance(make_teacher("function", max_turns=10), FunctionTeacher)
    with pytest.raises(ValueError, match="max_turns"):
        FunctionTeacher(max_turns=1)
    with pytest.raises(ValueError, match="style"):
        FunctionTeacher(style="terse")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tasks"):
        solve_rate(FunctionTeacher(), [])


@pytest.mark.parametrize("seed", range(4))
def test_split_scores_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    c, n = int(rng.integers(1, 7)), int(rng.integers(1, 50))
    keys = rng.integers(0, 6, (c, n)).astype(np.float64)
    keys[rng.random((c, n)) < 0.15] = np.inf  # undefined values form their own group
    _, test_ids = np.unique(rng.integers(0, 5, n), return_inverse=True)
    scores, worst = _split_scores(keys, test_ids, int(test_ids.max()) + 1)
    for j in range(c):
        groups: dict[float, list[int]] = {}
        for k, t in zip(keys[j], test_ids, strict=True):
            groups.setdefault(float(k), []).append(int(t))
        assert scores[j] == pytest.approx(sum(len(g) * len(set(g)) for g in groups.values()) / n)
        assert worst[j] == max(len(g) for g in groups.values())
