"""Evaluation metrics: Score, Pass@U-k, UR, turns, choice counts and their confidence intervals."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from bao_fast.envs import FunctionGym, FunctionTask, Gym, format_tool_call
from bao_fast.envs.llm_gyms import IntentionGym, IntentionTask, TelepathyGym, TelepathyTask
from bao_fast.envs.user_client import ChatCompletion, UserSimulatorClient
from bao_fast.eval.metrics import CHOICES, MAX_K, EpisodeRecord, mean_interval, summarize, wilson_interval
from bao_fast.eval.pareto import point_from_summary


def _random_episode(rng: random.Random) -> EpisodeRecord:
    n = rng.randint(0, 15)
    choices = [rng.choice(CHOICES) for _ in range(n)]
    rewards = [0.0] * n
    answers = [i for i, c in enumerate(choices) if c == "answer"]
    success = bool(answers) and rng.random() < 0.6
    if success:
        rewards[rng.choice(answers)] = 1.0
    return EpisodeRecord(tuple(choices), tuple(rewards), success)


def _reference(episodes: list[EpisodeRecord]) -> dict:
    """Straightforward per-definition computation."""
    n = len(episodes)
    out = {
        "score": sum(sum(e.rewards) for e in episodes) / n,
        "success_rate": sum(e.success for e in episodes) / n,
        "ur": sum((e.choices.count("answer") / len(e.choices)) if e.choices else 0.0 for e in episodes) / n,
        "turns": sum(len(e.choices) for e in episodes) / n,
    }
    passes = {}
    for k in range(1, MAX_K + 1):  # a solved episode used every answer it submitted
        passes[k] = sum(e.success and e.choices.count("answer") <= k for e in episodes) / n
    out["pass_at_u"] = passes
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_summarize_matches_definitions(seed: int) -> None:
    rng = random.Random(seed)
    episodes = [_random_episode(rng) for _ in range(rng.randint(1, 60))]
    got, ref = summarize(episodes), _reference(episodes)
    for key in ("score", "success_rate", "ur", "turns"):
        assert got[key] == pytest.approx(ref[key], abs=1e-12)
        lo, hi = got[f"{key}_ci"]
        assert lo <= got[key] + 1e-12 and got[key] <= hi + 1e-12
    assert got["pass_at_u"] == pytest.approx(ref["pass_at_u"])
    curve = [got["pass_at_u"][k] for k in range(1, MAX_K + 1)]
    assert curve == sorted(curve) and curve[-1] <= got["success_rate"] + 1e-12
    assert sum(got["choice_counts"].values()) == sum(len(e.choices) for e in episodes)
    if any(e.choices for e in episodes):
        assert sum(got["choice_fractions"].values()) == pytest.approx(1.0)


def test_hand_example() -> None:
    episodes = [
        EpisodeRecord(("search", "action", "answer"), (0.0, 0.0, 1.0), True),  # solved with 1st answer
        EpisodeRecord(("answer", "action", "answer", "answer"), (0.0, 0.0, 0.0, 1.0), True),  # 3rd answer
        EpisodeRecord(("action", "finish"), (0.0, 0.0), False),
        EpisodeRecord((), (), False),  # no tool call at all
    ]
    s = summarize(episodes)
    assert s["num_episodes"] == 4 and s["score"] == 0.5 and s["success_rate"] == 0.5
    assert s["pass_at_u"][1] == 0.25 and s["pass_at_u"][2] == 0.25 and s["pass_at_u"][3] == 0.5
    assert s["ur"] == pytest.approx((1 / 3 + 3 / 4 + 0 + 0) / 4)
    assert s["turns"] == pytest.approx(9 / 4) and s["answers"] == 1.0
    assert s["choice_counts"] == {"action": 3, "search": 1, "answer": 4, "finish": 1, "invalid": 0}
    long = summarize(episodes, max_k=12)  # Pass@U-k beyond the default 9, CIs alike
    assert list(long["pass_at_u"]) == list(long["pass_at_u_ci"]) == list(range(1, 13))
    assert long["pass_at_u"][12] == 0.5 and list(summarize(episodes, max_k=2)["pass_at_u"]) == [1, 2]


def test_pass_at_u_counts_every_submission_of_a_solved_episode() -> None:
    # Intention pays each coverage gain: the first answers have positive rewards, but only the third solves
    partial = EpisodeRecord(("answer", "answer", "answer"), (1 / 3, 1 / 3, 1 / 3), True)
    assert partial.answers_to_solve == 3
    assert summarize([partial], max_k=3)["pass_at_u"] == {1: 0.0, 2: 0.0, 3: 1.0}
    unsolved = EpisodeRecord(("answer", "answer"), (0.5, 0.0), False)
    assert unsolved.answers_to_solve is None and summarize([unsolved], max_k=2)["pass_at_u"] == {1: 0.0, 2: 0.0}
    # solved before any submission: no user effort, within every budget
    silent = EpisodeRecord(("action", "search"), (0.0, 0.0), True)
    assert silent.answers_to_solve == 0 and summarize([silent], max_k=2)["pass_at_u"] == {1: 1.0, 2: 1.0}


class _ScriptedJudge(UserSimulatorClient):
    """Answers every user-simulator / judge request with ``reply``; no server."""

    def __init__(self, reply: str) -> None:
        super().__init__("http://127.0.0.1:9", "judge")
        self.reply = reply

    def complete(self, messages: Sequence[Any], **kwargs: Any) -> ChatCompletion:
        return ChatCompletion(self.reply, None, "stop")


def _play(gym: Gym, task: Any, answers: Sequence[str]) -> EpisodeRecord:
    gym.reset(task, 0)
    steps = [gym.step(format_tool_call("answer", a)) for a in answers]
    assert steps[-1].terminated and not any(s.terminated for s in steps[:-1])
    return EpisodeRecord(tuple(s.info["choice"] for s in steps), tuple(s.reward for s in steps), gym.success)


@pytest.mark.parametrize(
    ("gym", "task", "answers"),
    [
        (FunctionGym(), FunctionTask("sum", "a+b+c+d", (1, 2, 3, 4), 10.0), ["3", "11", "10"]),
        (TelepathyGym(_ScriptedJudge("INCORRECT")), TelepathyTask("t", "Paris", "city"), ["Rome", "Lyon", "Paris"]),
        (
            IntentionGym(_ScriptedJudge('{"covered": []}')),
            IntentionTask("i", "book me a trip", ("budget: cheap", "city: Paris", "month: May")),
            ["something cheap", "cheap in Paris", "cheap in Paris in May"],
        ),
    ],
    ids=["function", "telepathy", "intention"],
)
def test_pass_at_u_on_gym_episodes(gym: Gym, task: Any, answers: list[str]) -> None:
    """Every gym ends the episode on the solving answer: Pass@U-k needs all three submissions. On Function
    and Telepathy only that answer pays, so the first positive reward would name the same submission."""
    record = _play(gym, task, answers)
    assert record.success and record.answers_to_solve == 3
    assert summarize([record], max_k=3)["pass_at_u"] == {1: 0.0, 2: 0.0, 3: 1.0}
    if not isinstance(gym, IntentionGym):
        assert [r > 0 for r in record.rewards] == [False, False, True]


def test_intervals_known_values() -> None:
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    with pytest.raises(ValueError, match="n must be positive"):
        wilson_interval(0, 0)
    # 0/1 values are a proportion: Wilson, with a width even when all are equal
    assert mean_interval(np.zeros(10), seed=0) == wilson_interval(0, 10)
    assert mean_interval(np.array([0.0, 1.0, 1.0]), seed=0) == wilson_interval(2, 3)
    assert mean_interval(np.full(4, 15.0), seed=0) == (15.0, 15.0)  # no spread to resample
    # rewards summed in floating point (Intention: 2/6 + 3/6 + 1/6) are still solved episodes
    solved = 2 / 6 + 3 / 6 + 1 / 6
    assert solved != 1.0
    assert mean_interval(np.array([solved, 1.0, 0.0]), seed=0) == wilson_interval(2, 3)
    assert wilson_interval(7, 7)[1] == 1.0 and wilson_interval(0, 7)[0] == 0.0  # exact at the bounds
    assert mean_interval(np.array([solved, 1e-6]), seed=0) != wilson_interval(1, 2)  # 1e-6 is no rounding


def test_mean_intervals_stay_in_the_feasible_range() -> None:
    # mostly-zero Score and UR: mean - 1.96 s/sqrt(n) was negative for both
    episodes = [EpisodeRecord(("action",), (0.0,), False)] * 17 + [
        EpisodeRecord(("action",), (1 / 3,), False),
        EpisodeRecord(("answer", "action"), (0.0, 0.0), False),
        EpisodeRecord(("answer", "action", "action", "action"), (0.0,) * 4, False),
    ]
    s = summarize(episodes)
    for key in ("score", "ur", "turns"):
        lo, hi = s[f"{key}_ci"]
        assert 0.0 <= lo <= s[key] <= hi and lo < hi
    assert s["ur_ci"][1] <= 0.5 and s["score_ci"][1] <= 1 / 3 and s["turns_ci"][0] >= 1.0
    assert s == summarize(episodes)  # seeded: deterministic
    zeros = summarize([EpisodeRecord(("action", "finish"), (0.0, 0.0), False)] * 20)
    assert zeros["score_ci"] == zeros["ur_ci"] == pytest.approx(list(wilson_interval(0, 20)))
    assert zeros["score_ci"][1] > 0.1 and zeros["turns_ci"] == [2.0, 2.0]
    ones = summarize([EpisodeRecord(("answer",), (1.0,), True)] * 8)  # one-turn episodes: turns are counts
    assert ones["turns_ci"] == [1.0, 1.0] and ones["score_ci"] == pytest.approx(list(wilson_interval(8, 8)))


def test_bootstrap_intervals_are_seeded_and_cover_the_mean() -> None:
    rng = random.Random(7)
    episodes = [_random_episode(rng) for _ in range(40)]
    a, b = summarize(episodes, ci="bootstrap", seed=3), summarize(episodes, ci="bootstrap", seed=3)
    assert a == b and a != summarize(episodes, ci="bootstrap", seed=4)
    for key in ("score", "ur", "turns", "success_rate"):
        lo, hi = a[f"{key}_ci"]
        assert lo <= a[key] <= hi and lo < hi


@dataclass
class _Trajectory:
    turn_choices: list[str] = field(default_factory=list)
    turn_rewards: list[float] = field(default_factory=list)
    success: bool = False


def test_inputs_coerced_from_trajectories_and_mappings() -> None:
    s = summarize([_Trajectory(["answer"], [1.0], True), {"choices": ["action"], "rewards": [0], "success": False}])
    assert s["score"] == 0.5 and s["pass_at_u"][1] == 0.5 and s["ur"] == 0.5


def test_summary_is_json_and_readable_by_pareto() -> None:
    s = summarize([EpisodeRecord(("answer",), (1.0,), True), EpisodeRecord(("action", "answer"), (0.0, 0.0), False)])
    point = point_from_summary(json.loads(json.dumps(s)), "run")
    assert point.score == s["score"] and point.ur == s["ur"] and len(point.pass_at_u) == MAX_K
    assert point.score_ci == pytest.approx(tuple(s["score_ci"]))


@pytest.mark.parametrize(
    ("episodes", "kwargs", "error", "match"),
    [
        ([], {}, ValueError, "empty"),
        ([EpisodeRecord(("answer",), (1.0,), True)], {"ci": "normal"}, ValueError, "ci"),
        ([{"choices": ["answer"], "success": True}], {}, ValueError, "rewards"),
        ([{"choices": ["answer"], "rewards": [1.0], "success": "false"}], {}, ValueError, "'success' must be a bool"),
        ([{"choices": "answer", "rewards": [1.0], "success": True}], {}, ValueError, "must be lists"),
        ([42], {}, TypeError, "int"),
        ([EpisodeRecord(("answer",), (1.0,), True)], {"max_k": 0}, ValueError, "max_k"),
    ],
)
def test_summarize_errors(episodes: list, kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        summarize(episodes, **kwargs)


def test_record_validation() -> None:
    with pytest.raises(ValueError, match="length"):
        EpisodeRecord(("answer",), (), True)
    with pytest.raises(ValueError, match="unknown"):
        EpisodeRecord(("guess",), (0.0,), False)
    with pytest.raises(ValueError, match="finite"):
        EpisodeRecord(("answer",), (math.nan,), False)
