"""The tiny initial model follows the ``model.tiny_*`` config keys."""

from __future__ import annotations

from bao_fast.config import load_config
from bao_fast.train.runtime import tiny_spec


def test_tiny_spec_follows_config() -> None:
    cfg = load_config(None, ["model.tiny=true", "model.tiny_hidden_size=256", "model.tiny_layers=3"])
    spec = tiny_spec(cfg.model)
    assert (spec.hidden_size, spec.num_hidden_layers) == (256, 3)
    assert spec.num_attention_heads * spec.head_dim == 256  # head_dim 64, as vLLM's CPU attention requires
    assert spec.num_attention_heads % spec.num_key_value_heads == 0
    assert spec.intermediate_size == 512
    default = tiny_spec(load_config(None, ["model.tiny=true"]).model)
    assert (default.hidden_size, default.num_hidden_layers, default.num_attention_heads) == (128, 2, 2)
