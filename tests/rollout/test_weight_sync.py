"""iter_full_weights on plain modules: order, dtype cast, tied-parameter dedup, wrapper-prefix stripping,
bucketing laziness and argument errors (the FSDP2 path runs in test_weight_sync_torchrun.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bao_fast.rollout import iter_full_weights, weight_sync
from bao_fast.rollout.weight_sync import hf_name


class _Wrapped(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self._checkpoint_wrapped_module = inner


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.ModuleDict({"embed": nn.Embedding(37, 5), "layer": _Wrapped(nn.Linear(5, 7)), "head": nn.Linear(5, 37)})
    model["head"].weight = model["embed"].weight  # tied, as with tie_word_embeddings
    return model


def test_names_order_dtype_and_values():
    model = _model()
    out = list(iter_full_weights(model, torch.bfloat16, bucket_mb=1e-4))
    assert [n for n, _ in out] == ["embed.weight", "layer.weight", "layer.bias", "head.bias"]
    params = dict(model.named_parameters())
    for name, tensor in out:
        assert tensor.dtype == torch.bfloat16
        source = params[name.replace("layer.", "layer._checkpoint_wrapped_module.")]
        torch.testing.assert_close(tensor, source.detach().to(torch.bfloat16), atol=0, rtol=0)


@pytest.mark.parametrize(("bucket_mb", "gathered_before_first"), [(1e-9, 1), (8e-4, 2), (1e3, 4)])
def test_buckets_bound_what_is_gathered(monkeypatch, bucket_mb, gathered_before_first):
    calls: list[int] = []
    original = weight_sync._full
    monkeypatch.setattr(weight_sync, "_full", lambda p, dtype: calls.append(p.numel()) or original(p, dtype))
    it = iter_full_weights(_model(), torch.float32, bucket_mb=bucket_mb)
    next(it)
    assert len(calls) == gathered_before_first  # a bucket is gathered, then handed out
    assert len(list(it)) == 3 and len(calls) == 4


def test_hf_name_strips_wrappers():
    assert hf_name("_orig_mod.model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight") == (
        "model.layers.0.mlp.up_proj.weight"
    )


def test_errors_name_the_argument():
    with pytest.raises(TypeError, match="model"):
        list(iter_full_weights("not a module", torch.float32))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bucket_mb"):
        list(iter_full_weights(_model(), torch.float32, bucket_mb=0))
