"""The 20-questions gym: generated bestiaries, the question grammar, the rule-based user's answers, search,
rewards and episode ends."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bao_fast.envs import make_gym, make_tasks
from bao_fast.envs.base import format_tool_call
from bao_fast.envs.entity_table import (
    ATTRIBUTES,
    Entity,
    EntityTable,
    Question,
    QuestionError,
    candidate_questions,
    generate_table,
    parse_question,
)
from bao_fast.envs.twenty_questions import LEVEL_SIZES, TwentyQuestionsGym, TwentyQuestionsTask, generate_tasks


def _task(seed: int = 0, level: int = 3) -> TwentyQuestionsTask:
    return generate_tasks(1, level, seed)[0]


def _play(gym: TwentyQuestionsGym, choice: str, content: str):
    return gym.step(format_tool_call(choice, content))


# ------------------------------------------------------------------------------------------------- tables


@pytest.mark.parametrize("size", [1, 7, 48])
def test_generate_table_is_valid_and_seeded(size):
    table = generate_table(size, seed=3)
    assert len(table) == size and table == generate_table(size, seed=3)
    assert len({e.name.lower() for e in table}) == size and len({e.values for e in table}) == size
    for entity in table:
        for attribute, value in zip(ATTRIBUTES, entity.values, strict=True):
            assert value in attribute.values
    assert generate_table(size, seed=4) != table


@pytest.mark.parametrize("bad", [0, 257, 2.0, True])
def test_generate_table_rejects_bad_size(bad):
    with pytest.raises(ValueError, match="num_entities"):
        generate_table(bad, seed=0)


def test_table_validation():
    a = generate_table(3, seed=0).entities
    with pytest.raises(ValueError, match="names must be unique"):
        EntityTable((a[0], Entity(a[0].name.upper(), a[1].values)))
    with pytest.raises(ValueError, match="share every attribute"):
        EntityTable((a[0], Entity("Other", a[0].values)))
    with pytest.raises(ValueError, match="not one of its allowed"):
        EntityTable((Entity("Odd", ("dragon", *a[0].values[1:])),))
    with pytest.raises(ValueError, match="empty"):
        EntityTable(())


# ---------------------------------------------------------------------------------------------- questions


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("is color red?", Question("color", "in", ("red",))),
        ("Is the colour Red or blue?", Question("color", "in", ("red", "blue"))),
        ("is habitat in forest, swamp?", Question("habitat", "in", ("forest", "swamp"))),
        ("habitat = cave", Question("habitat", "in", ("cave",))),
        ("class: bird", Question("class", "in", ("bird",))),
        ("is color not in grey, gray", Question("color", "not in", ("grey",))),
        ("is diet != carnivore?", Question("diet", "not in", ("carnivore",))),
        ("is legs > 4?", Question("legs", ">", (4,))),
        ("lifespan<=20", Question("lifespan", "<=", (20,))),
        ("is weight >= 100?", Question("weight", ">=", (100,))),
        ("is legs 2 or 4", Question("legs", "in", (2, 4))),
        ("is nocturnal?", Question("nocturnal", "in", ("yes",))),
        ("is venomous no?", Question("venomous", "in", ("no",))),
    ],
)
def test_parse_question(text, expected):
    assert parse_question(text) == expected
    assert parse_question(expected.render()) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("is it a bird?", "ask about one attribute"),
        ("", "ask about one attribute"),
        ("is color purple-ish?", "not a known color"),
        ("is size > 3?", "only applies to numbers"),
        ("is legs > many?", "takes one integer"),
        ("is legs > 2, 4?", "takes one integer"),
        ("is lifespan long?", "is a number"),
        ("is habitat?", "which habitat"),
    ],
)
def test_parse_question_errors(text, reason):
    with pytest.raises(QuestionError, match="I don't understand") as info:
        parse_question(text)
    assert reason in str(info.value)


@pytest.mark.parametrize(
    ("text", "reason"), [("is legs > " + "9" * 5000, "takes one integer"), ("is weight " + "9" * 5000, "is a number")]
)
def test_parse_question_rejects_huge_numbers(text, reason):
    """Numbers beyond int()'s digit limit are outside the grammar, not a ValueError from int()."""
    with pytest.raises(QuestionError, match=reason):
        parse_question(text)


def _brute_force(q: Question, e: Entity) -> bool:
    v = e.value(q.attribute)
    if q.op in ("in", "not in"):
        return (v in q.values) == (q.op == "in")
    return eval(f"{v} {q.op} {q.values[0]}")  # reference semantics on plain ints


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), data=st.data())
def test_question_semantics_match_reference(seed, data):
    table = generate_table(12, seed)
    attribute = data.draw(st.sampled_from(ATTRIBUTES))
    if attribute.kind == "number":
        op = data.draw(st.sampled_from(("in", "not in", "<", "<=", ">", ">=")))
        n = 1 if op not in ("in", "not in") else data.draw(st.integers(1, 3))
        values = tuple(data.draw(st.lists(st.integers(0, 70), min_size=n, max_size=n, unique=True)))
    else:
        op = data.draw(st.sampled_from(("in", "not in")))
        values = tuple(data.draw(st.lists(st.sampled_from(attribute.values), min_size=1, max_size=3, unique=True)))
    q = Question(attribute.name, op, values)
    assert parse_question(q.render()) == q
    for entity in table:
        assert q.holds(entity) == _brute_force(q, entity)


def test_candidate_questions_split_and_round_trip():
    entities = list(generate_table(16, seed=1))
    questions = list(candidate_questions(entities))
    assert questions
    for q in questions:
        yes = sum(q.holds(e) for e in entities)
        assert 0 < yes < len(entities)  # every candidate separates something
        assert parse_question(q.render()) == q
    assert not list(candidate_questions(entities[:1]))


# -------------------------------------------------------------------------------------------------- tasks


def test_generate_tasks():
    tasks = generate_tasks(6, level=(1, 4), seed=2)
    assert [t.id for t in tasks] == [t.id for t in generate_tasks(6, level=(1, 4), seed=2)]
    assert {len(t.table) for t in tasks} <= {LEVEL_SIZES[1], LEVEL_SIZES[4]}
    assert all(t.table.find(t.target) is t.target_entity for t in tasks)
    test = generate_tasks(6, level=(1, 4), seed=2, split="test")
    assert {t.table for t in test}.isdisjoint({t.table for t in tasks})
    for kwargs, name in (({"n": -1}, "n"), ({"level": 9}, "level"), ({"split": "all"}, "split")):
        with pytest.raises(ValueError, match=name):
            generate_tasks(**{"n": 1, **kwargs})


def test_registry_tasks():
    tasks = make_tasks("twenty_questions", split="test", n=3, level=2, seed=1)
    assert len(tasks) == 3 and all(len(t.table) == LEVEL_SIZES[2] for t in tasks)
    with pytest.raises(ValueError, match="n"):
        make_tasks("twenty_questions", level=2)
    with pytest.raises(ValueError, match="path"):
        make_tasks("twenty_questions", n=1, path="x.json")
    assert isinstance(make_gym("twenty_questions", max_turns=4), TwentyQuestionsGym)


def test_task_validation():
    table = generate_table(4, seed=0)
    with pytest.raises(ValueError, match="target"):
        TwentyQuestionsTask("t", table, "Nobody")
    with pytest.raises(ValueError, match="id"):
        TwentyQuestionsTask("", table, table.entities[0].name)
    with pytest.raises(TypeError, match="table"):
        TwentyQuestionsTask("t", list(table), table.entities[0].name)
    with pytest.raises(TypeError, match="TwentyQuestionsTask"):
        TwentyQuestionsGym().reset("not a task")


# ---------------------------------------------------------------------------------------------------- gym


def test_reset_messages():
    task = _task()
    messages = TwentyQuestionsGym(max_turns=9).reset(task, seed=0)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "at most 9 turns" in messages[0]["content"] and "interact_with_env" in messages[0]["content"]
    assert f"one of the {len(task.table)} creatures" in messages[1]["content"]
    assert task.target not in messages[0]["content"] + messages[1]["content"]


def test_user_answers_truthfully():
    task = _task(seed=5)
    gym = TwentyQuestionsGym(max_turns=1000)
    gym.reset(task)
    questions = list(candidate_questions(list(task.table)))
    for q in random.Random(0).sample(questions, 40):
        result = _play(gym, "action", q.render())
        assert result.feedback.split("\n")[0] == ("Yes." if q.holds(task.target_entity) else "No.")
        assert result.reward == 0.0 and not result.terminated
        assert result.info["choice"] == "action" and not result.info["user_involved"]


def test_user_explains_bad_questions():
    gym = TwentyQuestionsGym()
    gym.reset(_task())
    result = gym.step("[action] is it a dragon?")
    assert result.feedback.startswith("I don't understand") and "Attributes: class, color" in result.feedback
    assert result.reward == 0.0 and not result.terminated and result.info["error"] is None


def test_search():
    task = _task(seed=7, level=2)
    gym = TwentyQuestionsGym(max_turns=50)
    gym.reset(task)
    listing = _play(gym, "search", "").feedback
    assert "Attributes:" in listing and all(e.describe() in listing for e in task.table)
    assert _play(gym, "search", "ALL").feedback == listing
    target = task.target_entity
    assert _play(gym, "search", target.name.lower()).feedback.split("\n")[0] == target.describe()
    legs, color, nocturnal = (target.value(a) for a in ("legs", "color", "nocturnal"))
    conditions = f"legs > {legs - 1}; color {color} and nocturnal {nocturnal}"
    matches = [e for e in task.table if (e.value("legs") >= legs and e.value("color") == color
                                          and e.value("nocturnal") == nocturnal)]  # fmt: skip
    feedback = _play(gym, "search", conditions).feedback
    assert feedback.startswith(f"{len(matches)} creature(s)")
    assert sorted(line.split(":")[0] for line in feedback.split("\n")[1:-1]) == sorted(e.name for e in matches)
    assert _play(gym, "search", "legs > 8").feedback.startswith("No creature satisfies")
    assert _play(gym, "search", "shiny things").feedback.startswith("Invalid search")
    result = _play(gym, "search", "")
    assert result.reward == 0.0 and not result.info["user_involved"] and not gym.done


def test_answers_rewards_and_end():
    task = _task(seed=11, level=1)
    wrong = next(e.name for e in task.table if e.name != task.target)
    gym = TwentyQuestionsGym(max_turns=5)
    gym.reset(task)
    result = _play(gym, "answer", wrong)
    assert (result.reward, result.terminated, result.info["user_involved"], result.info["success"]) == (
        0.0, False, True, False)  # fmt: skip
    assert result.feedback.startswith(f"No, I am not thinking of {wrong}")
    result = _play(gym, "answer", "Mr Nobody")
    assert "no creature called" in result.feedback and result.reward == 0.0 and result.info["choice"] == "answer"
    result = _play(gym, "answer", f" {task.target.upper()}! ")
    assert (result.reward, result.terminated, result.truncated, result.info["success"]) == (1.0, True, False, True)
    assert gym.done and gym.success and result.feedback.endswith("Reward: 1.0")


def test_budget_finish_and_invalid_calls():
    gym = TwentyQuestionsGym(max_turns=3)
    gym.reset(_task())
    assert _play(gym, "action", "is nocturnal?").truncated is False
    result = gym.step('<tool_call>{"name": "interact_with_env", "arguments": {"choice": "fly"}}</tool_call>')
    assert result.info["choice"] == "invalid" and not result.terminated
    result = _play(gym, "action", "is venomous?")
    assert result.truncated and not result.terminated and gym.done and not gym.success
    gym.reset(_task())
    result = _play(gym, "finish", "")
    assert result.terminated and result.reward == 0.0 and result.info["choice"] == "finish"
    gym.reset(_task())
    result = gym.step("I think it is a bird.")  # no tool call ends the episode
    assert result.terminated and result.info["choice"] == "invalid"
