"""The scripted 20-questions teacher: solve rate within the budget, halving, faithful BAO reasoning, and
trajectories that replay exactly against a fresh gym."""

from __future__ import annotations

import math
import re

import pytest

from bao_fast.envs import make_teacher
from bao_fast.envs.base import parse_tool_call
from bao_fast.envs.entity_table import parse_question
from bao_fast.envs.teachers.twenty_questions_teacher import TwentyQuestionsTeacher
from bao_fast.envs.twenty_questions import LEVEL_SIZES, TwentyQuestionsGym, generate_tasks

_THINK = re.compile(r"^<think>\n(.*)\n</think>\n<tool_call>.*</tool_call>$", re.DOTALL)


@pytest.mark.parametrize("level", sorted(LEVEL_SIZES))
def test_solve_rate_and_turns(level):
    teacher = TwentyQuestionsTeacher(max_turns=12)
    tasks = generate_tasks(30, level, seed=100 + level, split="test")
    episodes = [teacher.play(task, seed=i) for i, task in enumerate(tasks)]
    rate = sum(e.success for e in episodes) / len(episodes)
    print(f"twenty_questions teacher, level {level} ({LEVEL_SIZES[level]} creatures): solve rate {rate:.3f}")
    assert rate >= 0.98
    bound = math.ceil(math.log2(LEVEL_SIZES[level])) + 2  # search + halving questions + answer
    assert max(e.num_turns for e in episodes) <= bound


def test_trajectory_format_and_replay():
    task = generate_tasks(1, 4, seed=3)[0]
    episode = TwentyQuestionsTeacher(seed=1).play(task, seed=2)
    messages = episode.messages
    assert [m["role"] for m in messages[:2]] == ["system", "user"]
    assert [m["role"] for m in messages[2:]] == ["assistant", "user"] * episode.num_turns
    gym = TwentyQuestionsGym()
    assert gym.reset(task, seed=2) == messages[:2]
    for k, (assistant, feedback) in enumerate(zip(messages[2::2], messages[3::2], strict=True), 1):
        assert _THINK.match(assistant["content"]), assistant["content"]
        assert gym.step(assistant["content"]).feedback == feedback["content"]  # what the teacher saw is real
        assert f"Turn {k} of 12." in assistant["content"]
    assert gym.success and episode.success and messages[-1]["content"].startswith("Yes!")


def test_reasoning_is_retrospective_and_prospective():
    task = generate_tasks(1, 5, seed=8)[0]
    episode = TwentyQuestionsTeacher().play(task, seed=0)
    survivors = list(task.table)
    calls = [parse_tool_call(m["content"]) for m in episode.messages[2::2]]
    assert calls[0].choice == "search" and calls[-1].choice == "answer" and calls[-1].content == task.target
    thoughts = [_THINK.match(m["content"]).group(1) for m in episode.messages[2::2]]
    assert f"one of {len(task.table)}" in thoughts[0] and "turns" in thoughts[0]  # the opening plan
    for call, thought in zip(calls[1:-1], thoughts[1:-1], strict=True):
        assert call.choice == "action"
        question = parse_question(call.content)
        yes = sum(question.holds(e) for e in survivors)
        # prospective: the budget and the split it expects; the split is the most even one available
        assert re.search(r"\d+ turns left", thought) and f"({yes} yes / {len(survivors) - yes} no)" in thought
        assert min(yes, len(survivors) - yes) >= len(survivors) // 3
        survivors = [e for e in survivors if question.holds(e) == question.holds(task.target_entity)]
    # retrospective: the last thought restates the answers and names the single survivor
    assert thoughts[-1].count(" -> ") == len(calls) - 2
    assert f"Only 1 creature fits every answer: {task.target}" in thoughts[-1]
    assert [e.name for e in survivors] == [task.target]


def test_survivor_lists_are_consistent():
    task = generate_tasks(1, 2, seed=4)[0]
    for thought in (m["content"] for m in TwentyQuestionsTeacher().solve(task, seed=0)[2::2]):
        match = re.search(r"still fit every answer: ([^.]*)\.", thought)
        if match:
            assert task.target in match.group(1)  # never eliminates the hidden creature


def test_tight_budget_guesses_on_the_last_turn():
    task = generate_tasks(1, 5, seed=9)[0]
    episode = TwentyQuestionsTeacher(max_turns=3).play(task, seed=0)
    assert episode.num_turns <= 3
    last = episode.messages[-2]["content"]
    assert parse_tool_call(last).choice == "answer"
    if not episode.success:
        assert "last turn" in last


def test_registry_and_validation():
    assert isinstance(make_teacher("twenty_questions", max_turns=8), TwentyQuestionsTeacher)
    for bad in (1, 2.5, True):
        with pytest.raises(ValueError, match="max_turns"):
            TwentyQuestionsTeacher(max_turns=bad)
