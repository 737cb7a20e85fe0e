"""BAO algorithm configuration: reward shaping and policy-loss options."""

from bao_fast.algo.loss import AGGREGATIONS, KL_TYPES, LossConfig
from bao_fast.algo.shaping import ALGORITHMS, ShapingConfig, preset

__all__ = ["AGGREGATIONS", "ALGORITHMS", "KL_TYPES", "LossConfig", "ShapingConfig", "preset"]
