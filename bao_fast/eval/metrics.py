"""Evaluation metrics of BAO/UserRL: Score, Pass@U-k, UR, turns and per-choice counts, with 95% CIs.

Definitions (per episode τ with per-turn choices a_t and rewards r_t, |τ| turns, U(τ) answer turns):

- **score**: mean over episodes of the task reward Σ_t r_t (Function: 1 when solved, so the success rate).
- **success_rate**: fraction of episodes whose task was solved.
- **pass_at_u[k]** (k = 1..9): fraction of episodes solved within their first k answer submissions. The
  solving submission is the first ``answer`` turn with a positive reward; an episode marked successful
  without such a turn counts with all its answers.
- **ur**: mean of U(τ)/|τ| (episodes with no turn count 0).
- **turns**: mean |τ|; **answers**: mean U(τ); **choice_counts** / **choice_fractions**: over all turns.

Confidence intervals (95%): proportions (success_rate, pass_at_u) use the Wilson score interval, which
stays inside [0, 1] and is sensible at 0 or n successes; means (score, ur, turns) use the normal
approximation mean ± 1.96·s/√n with the Bessel-corrected s. ``ci="bootstrap"`` instead resamples episodes
(percentile interval, 2000 resamples, seeded) for every metric.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
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
        """Answer submissions up to and including the solving one; None if unsolved."""
        if not self.success:
            return None
        seen = 0
        for choice, reward in zip(self.choices, self.rewards, strict=True):
            seen += choice == "answer"
            if choice == "answer" and reward > 0:
                return seen
        return seen

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
            return cls(tuple(episode["choices"]), tuple(map(float, episode["rewards"])), bool(episode["success"]))
        raise TypeError(f"episodes: cannot read an episode from {type(episode).__name__}")


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def normal_interval(values: Sequence[float], z: float = Z95) -> tuple[float, float]:
    """mean ± z·s/√n (s with Bessel's correction; zero width for a single value)."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    half = z * float(x.std(ddof=1)) / math.sqrt(len(x)) if len(x) > 1 else 0.0
    return mean - half, mean + half


def _bootstrap(values: np.ndarray, seed: int) -> tuple[float, float]:
    """Percentile interval of the mean of ``values`` float64[n] over episode resamples."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(BOOTSTRAP_SAMPLES, len(values)))
    means = values[idx].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def summarize(episodes: Iterable[Any], ci: str = "normal", seed: int = 0, max_k: int = MAX_K) -> dict[str, Any]:
    """Aggregate metrics of evaluation episodes (see the module docstring), Pass@U-k for k = 1..``max_k``;
    JSON-serialisable.

    Returns keys ``num_episodes, score, score_ci, success_rate, success_rate_ci, pass_at_u
    {k: value}, pass_at_u_ci {k: [lo, hi]}, ur, ur_ci, turns, turns_ci, answers, choice_counts,
    choice_fractions``; every ``*_ci`` is a [low, high] list.
    """
    if ci not in ("normal", "bootstrap"):
        raise ValueError(f"ci must be 'normal' or 'bootstrap', got {ci!r}")
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

    def proportion_ci(x: np.ndarray, key: int) -> list[float]:
        if ci == "bootstrap":
            return list(_bootstrap(x, seed + key))
        return list(wilson_interval(int(x.sum()), n))

    def mean_ci(x: np.ndarray, key: int) -> list[float]:
        return list(_bootstrap(x, seed + key) if ci == "bootstrap" else normal_interval(x))

    counts = Counter(c for r in records for c in r.choices)
    total_turns = int(turns.sum())
    return {
        "num_episodes": n,
        "score": float(score.mean()),
        "score_ci": mean_ci(score, 100),
        "success_rate": float(success.mean()),
        "success_rate_ci": proportion_ci(success, 101),
        "pass_at_u": {k: float(v.mean()) for k, v in passes.items()},
        "pass_at_u_ci": {k: proportion_ci(v, k) for k, v in passes.items()},
        "ur": float(ur.mean()),
        "ur_ci": mean_ci(ur, 102),
        "turns": float(turns.mean()),
        "turns_ci": mean_ci(turns, 103),
        "answers": float(np.mean([r.num_answers for r in records])),
        "choice_counts": {c: int(counts.get(c, 0)) for c in CHOICES},
        "choice_fractions": {c: counts.get(c, 0) / total_turns if total_turns else 0.0 for c in CHOICES},
    }
