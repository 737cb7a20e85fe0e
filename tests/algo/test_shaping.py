"""ShapingConfig: numbers are normalised to the types the kernels specialise on; bad values name the field."""

from __future__ import annotations

import pytest

from bao_fast.algo.shaping import ShapingConfig, preset


def test_integer_coefficients_become_floats() -> None:
    cfg = ShapingConfig("r2g", "sum", gamma=1, info_seeking_coef=0, overthinking_coef=0, eps=1)
    values = (cfg.gamma, cfg.info_seeking_coef, cfg.overthinking_coef, cfg.eps)
    assert values == (1.0, 0.0, 0.0, 1.0) and all(type(v) is float for v in values)
    assert cfg == ShapingConfig("r2g", "sum", gamma=1.0, info_seeking_coef=0.0, overthinking_coef=0.0, eps=1.0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"gamma": "0.8"}, TypeError, "ShapingConfig.gamma must be a number, got str"),
        ({"overthinking_coef": True}, TypeError, "ShapingConfig.overthinking_coef must be a number, got bool"),
        ({"horizon": 15.0}, TypeError, "ShapingConfig.horizon must be an int, got float"),
        ({"norm_by_std": 1}, TypeError, "ShapingConfig.norm_by_std must be a bool, got int"),
        ({"gamma": 1.5}, ValueError, r"ShapingConfig.gamma must be in \[0, 1\], got 1.5"),
        ({"info_seeking_coef": -0.1}, ValueError, "info_seeking_coef and overthinking_coef must be >= 0"),
        ({"horizon": 0}, ValueError, "ShapingConfig.horizon must be >= 1, got 0"),
        ({"turn_credit": "gae"}, ValueError, r"ShapingConfig.turn_credit must be one of \('r2g', 'equalized', 'em'\)"),
        ({"score": "max"}, ValueError, r"ShapingConfig.score must be one of \('sum', 'mean', 'r2g'\), got 'max'"),
        ({"eps": 0}, ValueError, "ShapingConfig.eps must be > 0, got 0.0"),
        ({"eps": float("inf")}, ValueError, "ShapingConfig.eps must be finite, got inf"),
        ({"info_seeking_coef": float("nan")}, ValueError, "ShapingConfig.info_seeking_coef must be finite, got nan"),
        ({"overthinking_coef": float("inf")}, ValueError, "ShapingConfig.overthinking_coef must be finite"),
    ],
)
def test_bad_values_name_the_field(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ShapingConfig(**kwargs)


def test_presets_follow_the_release() -> None:
    bao = preset("bao", horizon=12)
    assert (bao.turn_credit, bao.score, bao.info_seeking_coef, bao.overthinking_coef, bao.horizon) == (
        "r2g", "sum", 0.005, 0.05, 12)
    assert (preset("userrl").turn_credit, preset("userrl").score) == ("equalized", "mean")
    assert preset("grpo").overthinking_coef == 0.0 and preset("grpo").score == "sum"
    with pytest.raises(ValueError, match=r"algo\.name must be one of"):
        preset("ppo")
