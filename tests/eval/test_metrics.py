"""Evaluation metrics: Score, Pass@U-k, UR, turns, choice counts and their confidence intervals."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field

import pytest

from bao_fast.eval.metrics import CHOICES, MAX_K, EpisodeRecord, normal_interval, summarize, wilson_interval
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
    for k in range(1, MAX_K + 1):
        solved = 0
        for e in episodes:
            if not e.success:
                continue
            used = 0
            for c, r in zip(e.choices, e.rewards, strict=True):
                used += c == "answer"
                if c == "answer" and r > 0:
                    break
            solved += used <= k
        passes[k] = solved / n
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


def test_intervals_known_values() -> None:
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    values = [0.0, 1.0, 2.0, 5.0]
    mean, sd = 2.0, math.sqrt(sum((v - 2.0) ** 2 for v in values) / 3)
    assert normal_interval(values) == pytest.approx((mean - 1.959964 * sd / 2, mean + 1.959964 * sd / 2))
    assert normal_interval([3.0]) == (3.0, 3.0)
    with pytest.raises(ValueError, match="n must be positive"):
        wilson_interval(0, 0)


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
        ([EpisodeRecord(("answer",), (1.0,), True)], {"ci": "exact"}, ValueError, "ci"),
        ([{"choices": ["answer"], "success": True}], {}, ValueError, "rewards"),
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
