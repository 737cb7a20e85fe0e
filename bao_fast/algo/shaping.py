"""BAO reward-shaping configuration (../shared/BAO.md, stage 2) and the named algorithm presets."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

TurnCredit = Literal["r2g", "equalized", "em"]
TrajectoryScore = Literal["sum", "mean", "r2g"]
TURN_CREDITS: tuple[str, ...] = ("r2g", "equalized", "em")
TRAJECTORY_SCORES: tuple[str, ...] = ("sum", "mean", "r2g")


@dataclass(frozen=True)
class ShapingConfig:
    """How per-turn rewards become turn credits, trajectory scores and token advantages.

    turn_credit: r2g (BAO, discounted reward-to-go) | equalized (UserRL, c_t = 1) | em.
    score: sum (BAO) | mean (UserRL's "Sum") | r2g (discounted return).
    info_seeking_coef: λ_IS, penalty for consecutive answers in a failed trajectory.
    overthinking_coef: λ_OT, penalty for failed trajectories that ended before ``horizon`` turns; 0 switches
        the whole penalty off (its +0.2 and one-turn 0.5 terms too, which BAO.md states without λ_OT).
    horizon: the turn budget T. norm_by_std: divide by the group std (GRPO) or not (Dr.GRPO).

    Token advantages are c_t · Â · N / C (BAO.md). Where one trajectory's credits have mixed signs (em credits
    under a large over-thinking penalty, or a gym with negative rewards), C can be near 0 and its advantages
    far larger than Â; RL logs ``advantage_abs_max`` next to ``advantage_abs_mean`` to show it.
    """

    turn_credit: TurnCredit = "r2g"
    score: TrajectoryScore = "sum"
    gamma: float = 0.8
    info_seeking_coef: float = 0.0
    overthinking_coef: float = 0.0
    horizon: int = 15
    norm_by_std: bool = True
    eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("gamma", "info_seeking_coef", "overthinking_coef", "eps"):  # ints become floats: the
            value = getattr(self, name)  # Triton kernel specialises on the argument's type
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"ShapingConfig.{name} must be a number, got {type(value).__name__}")
            if not math.isfinite(value):  # NaN would give NaN advantages, an infinite eps all-zero ones
                raise ValueError(f"ShapingConfig.{name} must be finite, got {value}")
            object.__setattr__(self, name, float(value))
        if isinstance(self.horizon, bool) or not isinstance(self.horizon, int):
            raise TypeError(f"ShapingConfig.horizon must be an int, got {type(self.horizon).__name__}")
        if not isinstance(self.norm_by_std, bool):
            raise TypeError(f"ShapingConfig.norm_by_std must be a bool, got {type(self.norm_by_std).__name__}")
        if self.turn_credit not in TURN_CREDITS:
            raise ValueError(f"ShapingConfig.turn_credit must be one of {TURN_CREDITS}, got {self.turn_credit!r}")
        if self.score not in TRAJECTORY_SCORES:
            raise ValueError(f"ShapingConfig.score must be one of {TRAJECTORY_SCORES}, got {self.score!r}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"ShapingConfig.gamma must be in [0, 1], got {self.gamma}")
        if self.info_seeking_coef < 0 or self.overthinking_coef < 0:
            raise ValueError(
                "ShapingConfig.info_seeking_coef and overthinking_coef must be >= 0, got "
                f"{self.info_seeking_coef} and {self.overthinking_coef}"
            )
        if self.horizon < 1:
            raise ValueError(f"ShapingConfig.horizon must be >= 1, got {self.horizon}")
        if self.eps <= 0:
            raise ValueError(f"ShapingConfig.eps must be > 0, got {self.eps}")


ALGORITHMS: tuple[str, ...] = ("bao", "userrl", "grpo")


def preset(name: str, horizon: int = 15) -> ShapingConfig:
    """Shaping of a named algorithm: ``bao`` (r2g credits, sum score, both penalties at the release
    coefficients), ``userrl`` (equalized credits, mean score), ``grpo`` (outcome reward: equalized credits,
    sum score, no penalties)."""
    presets = {
        "bao": ShapingConfig("r2g", "sum", info_seeking_coef=0.005, overthinking_coef=0.05),
        "userrl": ShapingConfig("equalized", "mean"),
        "grpo": ShapingConfig("equalized", "sum"),
    }
    if name not in presets:
        raise ValueError(f"algo.name must be one of {ALGORITHMS}, got {name!r}")
    return replace(presets[name], horizon=horizon)
