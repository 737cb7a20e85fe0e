"""Evaluation metrics of BAO/UserRL: Score, Pass@U-k, UR, turns and per-choice counts, with 95% CIs.

Definitions (per episode τ with per-turn choices a_t and rewards r_t, |τ| turns, U(τ) answer turns):

- **score**: mean over episodes of the task reward Σ_t r_t (Function: 1 when solved, so the success rate).
- **success_rate**: fraction of episodes whose task was solved.
- **pass_at_u[k]** (k = 1..9): fraction of episodes solved within their first k answer submissions
  (:attr:`EpisodeRecord.answers_to_solve` <= k). Every gym ends the episode on the submission that solves
  it, so a solved episode needed all U(τ) of its submissions; rewards do not mark the solving one
  (Intention pays each coverage gain, so earlier, partial answers have positive rewards too).
- **ur**: mean of U(τ)/|τ| (episodes with no turn count 0).
- **turns**: mean |τ|; **answers**: mean U(τ); **choice_counts** / **choice_fractions**: over all turns.

Confidence intervals (95%), ``ci="auto"``: proportions (success_rate, pass_at_u) and means whose per-episode
values are all 0 or 1 (then a proportion too: Score on Function or Telepathy, UR when no episode answers)
use the Wilson score interval, which stays inside [0, 1] and keeps a width at 0 or n successes; other means
(score, ur, turns) use the percentile bootstrap over episodes (2000 resamples, seeded, so deterministic),
which stays inside the observed range and is asymmetric near a bound. A sample of equal non-binary values
(every episode 15 turns) has nothing to resample: its interval is that value. ``ci="bootstrap"``
bootstraps every metric.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

CHOICES: tuple[str, ...] = ("action", "search", "answer", "finish", "invalid")
MAX_K = 9
Z95 = 1.959963984540054
BOOTSTRAP_SAMPLES = 2000


@dataclass(frozen=True)
class EpisodeRecord:
    """What the metrics need from one episode: per-turn ``choices`` (action | search | answer | finish |
    invalid) and ``rewards`` (same length), and whether the task was solved."""

    choices: tuple[str, ...]
    rewards: tuple[float, ...]
    success: bool

    def __post_init__(self) -> None:
        if len(self.choices) != len(self.rewards):
            raise ValueError(f"choices and rewards differ in length: {len(self.choices)} vs {len(self.rewards)}")
        unknown = sorted(set(self.choices) - set(CHOICES))
        if unknown:
            raise ValueError(f"choices: unknown values {unknown}; allowed {CHOICES}")
        if not all(math.isfinite(r) for r in self.rewards):
            raise ValueError(f"rewards must be finite, got {self.rewards}")

    @property
    def num_turns(self) -> int:
        return len(self.choices)

    @property
    def num_answers(self) -> int:
        return sum(c == "answer" for c in self.choices)

    @property
    def answers_to_solve(self) -> int | None:
        """Answer submissions the episode used to solve its task, None if unsolved: all of them, since
        every gym ends the episode on the solving submission (Function, Telepathy and Twenty Questions pay
        only that one, Intention pays every coverage gain on the way). A task solved without any
        submission used no user effort, so it counts 0 and passes Pass@U-k for every k: it was solved
        before the first submission, and Pass@U-k stays a budget curve rising to the success rate."""
        return self.num_answers if self.success else None

    @classmethod
    def of(cls, episode: Any) -> EpisodeRecord:
        """Coerce an :class:`EpisodeRecord`, a rollout ``Trajectory`` (``turn_choices``, ``turn_rewards``,
        ``success``) or a mapping with ``choices``, ``rewards``, ``success``."""
        if isinstance(episode, EpisodeRecord):
            return episode
        if hasattr(episode, "turn_choices"):
            return cls(tuple(episode.turn_choices), tuple(map(float, episode.turn_rewards)), bool(episode.success))
        if isinstance(episode, Mapping):
            missing = [k for k in ("choices", "rewards", "success") if k not in episode]
            if missing:
                raise ValueError(f"episode mapping is missing keys {missing}")
            choices, rewards, success = episode["choices"], episode["rewards"], episode["success"]
            if not isinstance(choices, list | tuple) or not isinstance(rewards, list | tuple):
                raise ValueError(f"episode mapping: 'choices' and 'rewards' must be lists, got {choices!r}, "
                                 f"{rewards!r}")
            if not isinstance(success, bool) and success not in (0, 1):
                raise ValueError(f"episode mapping: 'success' must be a bool, got {success!r}")
            return cls(tuple(choices), tuple(map(float, rewards)), bool(success))
        raise TypeError(f"episodes: cannot read an episode from {type(episode).__name__}")


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, center - half)  # exactly the bound, not a rounding below it
    hi = 1.0 if successes == n else min(1.0, center + half)
    return lo, hi


def _bootstrap(values: np.ndarray, seed: int) -> tuple[float, float]:
    """Percentile interval of the mean of ``values`` float64[n] over episode resamples."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(BOOTSTRAP_SAMPLES, len(values)))
    means = values[idx].mean(axis=1)
    lo, hi = np.clip(np.quantile(means, (0.025, 0.975)), values.min(), values.max())  # no rounding past the data
    return float(lo), float(hi)


def mean_interval(values: np.ndarray, seed: int) -> tuple[float, float]:
    """95% interval of the mean of ``values`` float64[n]: Wilson when every value is 0 or 1 (to 1e-9: rewards
    summed in floating point, such as 1/3 + 1/3 + 1/3, are still solved episodes), else the percentile
    bootstrap seeded with ``seed``."""
    binary = np.rint(values)
    if (np.isin(binary, (0.0, 1.0)) & np.isclose(values, binary, rtol=0.0, atol=1e-9)).all():
        return wilson_interval(int(binary.sum()), len(values))
    return _bootstrap(values, seed)


def summarize(episodes: Iterable[Any], ci: str = "auto", seed: int = 0, max_k: int = MAX_K) -> dict[str, Any]:
    """Aggregate metrics of evaluation episodes (see the module docstring), Pass@U-k for k = 1..``max_k``;
    JSON-serialisable.

    Returns keys ``num_episodes, score, score_ci, success_rate, success_rate_ci, pass_at_u
    {k: value}, pass_at_u_ci {k: [lo, hi]}, ur, ur_ci, turns, turns_ci, answers, choice_counts,
    choice_fractions``; every ``*_ci`` is a [low, high] list.
    """
    if ci not in ("auto", "bootstrap"):
        raise ValueError(f"ci must be 'auto' or 'bootstrap', got {ci!r}")
    if isinstance(max_k, bool) or not isinstance(max_k, int) or max_k < 1:
        raise ValueError(f"max_k must be an int >= 1, got {max_k!r}")
    records = [EpisodeRecord.of(e) for e in episodes]
    if not records:
        raise ValueError("episodes must not be empty")
    n = len(records)
    score = np.asarray([sum(r.rewards) for r in records], dtype=np.float64)
    success = np.asarray([r.success for r in records], dtype=np.float64)
    ur = np.asarray([r.num_answers / r.num_turns if r.num_turns else 0.0 for r in records], dtype=np.float64)
    turns = np.asarray([r.num_turns for r in records], dtype=np.float64)
    solve_k = [r.answers_to_solve for r in records]
    passes = {k: np.asarray([s is not None and s <= k for s in solve_k], dtype=np.float64) for k in range(1, max_k + 1)}

    def interval(x: np.ndarray, key: int) -> list[float]:  # proportions are 0/1 means: Wilson under "auto"
        return list(_bootstrap(x, seed + key) if ci == "bootstrap" else mean_interval(x, seed + key))

    counts = Counter(c for r in records for c in r.choices)
    total_turns = int(turns.sum())
    return {
        "num_episodes": n,
        "score": float(score.mean()),
        "score_ci": interval(score, 100),
        "success_rate": float(success.mean()),
        "success_rate_ci": interval(success, 101),
        "pass_at_u": {k: float(v.mean()) for k, v in passes.items()},
        "pass_at_u_ci": {k: interval(v, k) for k, v in passes.items()},
        "ur": float(ur.mean()),
        "ur_ci": interval(ur, 102),
        "turns": float(turns.mean()),
        "turns_ci": list(_bootstrap(turns, seed + 103)),  # counts, not proportions: never Wilson
        "answers": float(np.mean([r.num_answers for r in records])),
        "choice_counts": {c: int(counts.get(c, 0)) for c in CHOICES},
        "choice_fractions": {c: counts.get(c, 0) / total_turns if total_turns else 0.0 for c in CHOICES},
    }
