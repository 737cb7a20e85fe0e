"""LossConfig: the release defaults, and every bad value refused with a message naming the field."""

from __future__ import annotations

import pytest

from bao_fast.algo.loss import AGGREGATIONS, LossConfig


def test_defaults_follow_the_release() -> None:
    """BAO.md: clip 0.2 both ways, dual clip 3, no KL, no entropy bonus, token-mean aggregation."""
    cfg = LossConfig()
    assert (cfg.clip_low, cfg.clip_high, cfg.dual_clip, cfg.kl_coef, cfg.entropy_coef, cfg.agg) == (
        0.2, 0.2, 3.0, 0.0, 0.0, "token-mean")


def test_only_seq_mean_token_sum_norm_needs_norm_length() -> None:
    others = [agg for agg in AGGREGATIONS if agg != "seq-mean-token-sum-norm"]
    assert [LossConfig(agg=agg).agg for agg in others] == others
    assert LossConfig(agg="seq-mean-token-sum-norm", norm_length=64.0).norm_length == 64.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clip_low": -0.1}, "LossConfig.clip_low/clip_high must be >= 0, got -0.1, 0.2"),
        ({"clip_high": -0.1}, "LossConfig.clip_low/clip_high must be >= 0, got 0.2, -0.1"),
        ({"dual_clip": 1.0}, "LossConfig.dual_clip must be > 1, got 1.0"),
        ({"kl_coef": -0.1}, "LossConfig.kl_coef must be >= 0 and finite, got -0.1"),
        ({"kl_coef": float("inf")}, "LossConfig.kl_coef must be >= 0 and finite, got inf"),
        ({"kl_coef": float("nan")}, "LossConfig.kl_coef must be >= 0 and finite, got nan"),
        ({"entropy_coef": -0.01}, "LossConfig.entropy_coef must be >= 0 and finite"),
        ({"kl_type": "k4"}, r"LossConfig.kl_type must be one of \('k1', 'k2', 'k3'\), got 'k4'"),
        ({"agg": "sum"}, "LossConfig.agg must be one of .*, got 'sum'"),
        ({"agg": "seq-mean-token-sum-norm"}, "LossConfig.norm_length must be > 0 when agg is"),
        ({"agg": "seq-mean-token-sum-norm", "norm_length": 0.0}, "LossConfig.norm_length must be > 0 when agg is"),
    ],
)
def test_bad_values_name_the_field(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LossConfig(**kwargs)
