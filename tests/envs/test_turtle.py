"""Turtle Soup gym against a scripted stub server: yes/no questions that cannot leak the solution, weighted
key-point scoring with best-score-delta rewards, robust reading of the judge, UserRL's story file."""

from __future__ import annotations

import json

import pytest

from bao_fast.envs import make_gym, make_tasks, needs_user_simulator
from bao_fast.envs.base import format_tool_call
from bao_fast.envs.turtle import TurtleGym, TurtleTask, parse_scores, turtle_tasks
from bao_fast.envs.user_client import UserSimulatorClient

HICCUPS = TurtleTask("t1", "She asks for water; he points a gun at her; she thanks him and leaves.",
                     "She had hiccups; the fright cured them.",
                     (("She had hiccups", 0.6), ("The fright cured them", 0.3), ("The water was not needed", 0.1)))


def _routed(stub, user: list[str], judge: list[str]) -> None:
    queues = {"user": list(user), "judge": list(judge)}

    def handler(body):
        role = "judge" if body["messages"][0]["content"].startswith("You grade") else "user"
        return stub.completion(queues[role].pop(0))

    stub.handler = handler


def _gym(stub, **kwargs) -> TurtleGym:
    return TurtleGym(UserSimulatorClient(stub.url, "sim", max_retries=0), **kwargs)


def _step(gym, choice, content):
    return gym.step(format_tool_call(choice, content))


def test_questions_are_answered_from_the_secret_without_leaking_it(openai_stub):
    _routed(openai_stub, ["Yes, she had hiccups!", "<think>no</think>No.", "Hmm, interesting."], [])
    gym = _gym(openai_stub, user_max_tokens=7)
    messages = gym.reset(HICCUPS, seed=1)
    assert HICCUPS.surface in messages[1]["content"] and "hiccups" not in json.dumps(messages)
    first = _step(gym, "action", "Was she unwell?")
    assert first.feedback.split("\n")[0] == "Yes." and "hiccups" not in first.feedback
    assert (first.reward, first.info["user_involved"]) == (0.0, False)
    assert _step(gym, "action", "Was the gun loaded?").feedback.split("\n")[0] == "No."
    assert _step(gym, "action", "Was it night?").feedback.startswith("I am not sure")
    request = openai_stub.requests[-1]
    assert HICCUPS.bottom in request["messages"][0]["content"] and request["max_tokens"] == 7
    assert [m["content"] for m in request["messages"][1:]] == [
        "Was she unwell?", "Yes.", "Was the gun loaded?", "No.", "Was it night?"
    ]


def test_explanations_earn_the_increase_of_the_best_weighted_score(openai_stub):
    _routed(openai_stub, [], [
        '{"scores": [0.5, 0, 0]}',  # 0.3
        'Scores: {"scores": [1, 0, 1]}',  # 0.7
        '```json\n{"scores": [{"score": 0.5}, {"score": 0}, {"score": 0}]}\n```',  # 0.3: below the best
        "I cannot grade this.",  # unreadable: 0
        '{"scores": [1, 1, "0.5"]}',  # 0.95: solved
    ])  # fmt: skip
    gym = _gym(openai_stub)
    gym.reset(HICCUPS)
    results = [_step(gym, "answer", f"explanation {i}") for i in range(5)]
    assert [r.reward for r in results] == pytest.approx([0.3, 0.4, 0.0, 0.0, 0.25])
    assert sum(r.reward for r in results) == pytest.approx(gym.best_score) == pytest.approx(0.95)
    assert [r.terminated for r in results] == [False] * 4 + [True] and gym.success
    assert all(r.info["user_involved"] for r in results)
    assert "any key point" in results[0].feedback
    assert "- She had hiccups\n- The water was not needed" in results[1].feedback
    assert HICCUPS.bottom in results[4].feedback  # the story is told once solved
    assert [e.parsed for e in gym.exchanges] == ["[0.5, 0.0, 0.0]", "[1.0, 0.0, 1.0]", "[0.5, 0.0, 0.0]", None,
                                                 "[1.0, 1.0, 0.5]"]  # fmt: skip
    judge = openai_stub.requests[0]
    points = "1. She had hiccups\n2. The fright cured them\n3. The water was not needed"
    assert points in judge["messages"][0]["content"]
    assert judge["temperature"] == 0.0 and judge["max_tokens"] == 96


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('{"scores": [1, 0.5]}', [1.0, 0.5]),
        ('{"scores": [1]} then {"scores": [0, "1"]}', [0.0, 1.0]),  # the first object of the right length
        ('{"scores": [1, 0.7]}', None),  # not a valid score
        ('{"scores": [true, 0]}', None),
        ('{"scores": [1, 0, 1]}', None),  # one per key point
        ('{"scores": [1e999999, 0]}', None),
        ('{"scores": [' + "9" * 400 + ', 0]}', None),  # an int beyond float's range: unreadable, not a crash
        ("[" * 5000 + '{"scores": [1, 1]}', [1.0, 1.0]),
        ("no json", None),
    ],
)
def test_parse_scores(reply, expected):
    assert parse_scores(reply, 2) == expected


def test_tasks_and_registry(tmp_path):
    train, test = turtle_tasks("train"), turtle_tasks("test")
    assert (len(train), len(test)) == (9, 3) and not {t.id for t in train} & {t.id for t in test}
    assert make_tasks("turtle", split="train", n=4, seed=2) == turtle_tasks("train", n=4, seed=2)
    assert all(abs(sum(w for _, w in t.points) - 1.0) < 1e-9 for t in train + test)
    assert needs_user_simulator("turtle")
    stories = [{"title": "Lift", "description": "surface", "ground_truth": "bottom",
                "evaluation_criteria": [{"statement": "a", "score": 0.7}, {"statement": "b", "score": 0.3}]},
               {"description": "s2", "ground_truth": "b2", "evaluation_criteria": [{"statement": "c", "score": 1}]}]
    path = tmp_path / "turtle.json"
    path.write_text(json.dumps(stories))
    loaded = sorted(turtle_tasks(path=str(path)), key=lambda t: t.id)
    assert loaded == [TurtleTask("Lift", "surface", "bottom", (("a", 0.7), ("b", 0.3))),
                      TurtleTask("turtle-001", "s2", "b2", (("c", 1),))]  # fmt: skip
    path.write_text(json.dumps([{"description": "s"}]))
    with pytest.raises(ValueError, match="missing keys"):
        turtle_tasks(path=str(path))


def test_validation(openai_stub):
    with pytest.raises(ValueError, match="points"):
        TurtleTask("x", "s", "b", ())
    with pytest.raises(ValueError, match="points"):
        TurtleTask("x", "s", "b", (("a", 0),))
    with pytest.raises(ValueError, match="bottom"):
        TurtleTask("x", "s", " ", (("a", 1.0),))
    with pytest.raises(ValueError, match="success_threshold"):
        _gym(openai_stub, success_threshold=0)
    gym = make_gym("turtle", client=UserSimulatorClient(openai_stub.url, "sim"), max_turns=3)
    assert gym.max_turns == 3 and gym.success_threshold == 0.9
    with pytest.raises(TypeError, match="TurtleTask"):
        gym.reset("not a task")
    gym.reset(HICCUPS)
    result = _step(gym, "search", "the answer")
    assert result.info["choice"] == "invalid" and not openai_stub.requests
