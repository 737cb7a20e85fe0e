"""Policy-loss configuration (clipped surrogate, optional KL) shared by the trainer and the ops."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
AGGREGATIONS: tuple[str, ...] = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
KL_TYPES: tuple[str, ...] = ("k1", "k2", "k3")


@dataclass(frozen=True)
class LossConfig:
    """Options of ``bao_fast.ops.clipped_ratio_loss`` (the release: symmetric 0.2 clip, dual clip 3,
    no KL, token-mean). ``norm_length`` is required by ``seq-mean-token-sum-norm``. ``kl_coef > 0`` makes RL
    load a second, frozen copy of the starting model as the KL reference (its memory, and one more forward per
    mini-batch)."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float = 3.0
    kl_coef: float = 0.0
    kl_type: Literal["k1", "k2", "k3"] = "k3"
    agg: Aggregation = "token-mean"
    norm_length: float | None = None
    entropy_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.clip_low < 0 or self.clip_high < 0:
            raise ValueError(f"LossConfig.clip_low/clip_high must be >= 0, got {self.clip_low}, {self.clip_high}")
        if self.dual_clip <= 1.0:
            raise ValueError(f"LossConfig.dual_clip must be > 1, got {self.dual_clip}")
        if not 0 <= self.kl_coef < math.inf:
            raise ValueError(f"LossConfig.kl_coef must be >= 0 and finite, got {self.kl_coef}")
        if not 0 <= self.entropy_coef < math.inf:
            raise ValueError(
                f"LossConfig.entropy_coef must be >= 0 and finite (a bonus for entropy), got {self.entropy_coef}"
            )
        if self.kl_type not in KL_TYPES:
            raise ValueError(f"LossConfig.kl_type must be one of {KL_TYPES}, got {self.kl_type!r}")
        if self.agg not in AGGREGATIONS:
            raise ValueError(f"LossConfig.agg must be one of {AGGREGATIONS}, got {self.agg!r}")
        if self.agg == "seq-mean-token-sum-norm" and (self.norm_length is None or self.norm_length <= 0):
            raise ValueError("LossConfig.norm_length must be > 0 when agg is 'seq-mean-token-sum-norm'")
