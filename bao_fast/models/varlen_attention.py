"""Varlen causal attention for packed forwards, registered with transformers' attention interfaces.

transformers attends over a packed stream (batch 1, ``position_ids`` restarting per trajectory) with sdpa /
eager by building a dense ``[T, T]`` block-diagonal mask, so attention costs ``T²`` instead of ``Σ L_b²``.
This module registers ``bao_varlen_sdpa`` and ``bao_varlen_eager``: implementations that behave exactly like
their base (``sdpa`` / ``eager``: same masks, same attention) unless the forward gets
``varlen_inputs(seq_lens, device)``: ``varlen_seq_lens=(L_0, ..., L_{B-1})`` and an empty, "already prepared"
4-D ``attention_mask``, so transformers builds no mask and runs no packed-sequence detection (which reads the
device). Then every trajectory attends causally to its own slice of the stream only: on CUDA with fp16/bf16
inputs in one flash-attention varlen launch (``torch.nn.attention.varlen.varlen_attn``, where this torch has
it), otherwise one ``scaled_dot_product_attention`` per run of consecutive equal-length trajectories.

The switch is permanent on the model (``enable_varlen_attention``) rather than scoped to one forward: with
gradient checkpointing the decoder layers run again in the backward pass, after any scope has closed, and
they must pick the same attention then. The lengths travel as a layer kwarg, so the recomputation sees them.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

#: base implementation -> its varlen-capable counterpart.
VARLEN_IMPLEMENTATIONS = {"sdpa": "bao_varlen_sdpa", "eager": "bao_varlen_eager"}
#: attention kwargs of logit transforms the per-sequence path does not reproduce.
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks")

try:  # flash-attention varlen (CUDA): torch >= 2.9; its causal flag changed name across versions
    from torch.nn.attention.varlen import varlen_attn as _FLASH_VARLEN
except ImportError:
    _FLASH_VARLEN = None
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=8)
def _parameter_names(fn: Callable[..., Any]) -> frozenset[str]:
    """``fn``'s parameter names, read once (every layer of every forward asks)."""
    return frozenset(inspect.signature(fn).parameters)


def _flash_causal_kwargs(fn: Callable[..., torch.Tensor], gqa: bool, scaling: float | None) -> dict[str, Any] | None:
    """Keyword arguments that make ``varlen_attn`` causal (GQA, scaled by ``scaling``) in this torch; None if it
    cannot be (no causal flag, or a custom scale that this version does not take)."""
    params = _parameter_names(fn)
    if "window_size" in params:
        kwargs: dict[str, Any] = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        kwargs = {"is_causal": True}
    else:
        return None
    if gqa and "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    if scaling is not None:
        if "scale" not in params:
            return None
        kwargs["scale"] = scaling
    return kwargs


@functools.lru_cache(maxsize=4)
def _device_cu_seqlens(seq_lens: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """int32 ``[B+1]`` offsets of ``seq_lens`` on ``device``, copied once per batch from pinned memory without
    blocking the host (every layer of a forward, and its recomputation, shares the tensor)."""
    host = torch.tensor([0, *itertools.accumulate(seq_lens)], dtype=torch.int32)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)


def _flash_supports(query: torch.Tensor) -> bool:
    """Flash attention's requirements: CUDA sm_80+, fp16/bf16, head dim a multiple of 8 up to 256."""
    d = query.shape[-1]
    if not query.is_cuda or query.dtype not in _FLASH_DTYPES or d > 256 or d % 8:
        return False
    return torch.cuda.get_device_capability(query.device)[0] >= 8


def flash_varlen_causal_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, seq_lens: Sequence[int], scaling: float | None
) -> torch.Tensor | None:
    """One flash-attention varlen launch over the packed stream, or None where it does not apply (no CUDA,
    older than sm_80, not fp16/bf16, head dim over 256 or not a multiple of 8, no ``varlen_attn`` in this torch).

    Shapes as ``varlen_causal_attention``; the result is ``[1, T, Hq, D]``.
    """
    if _FLASH_VARLEN is None or not _flash_supports(query):
        return None
    kwargs = _flash_causal_kwargs(_FLASH_VARLEN, gqa=key.shape[1] != query.shape[1], scaling=scaling)
    if kwargs is None:
        return None
    cu_seqlens = _device_cu_seqlens(tuple(seq_lens), query.device)
    longest = max(seq_lens)
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))  # [T, H, D]
    out = _FLASH_VARLEN(q, k, v, cu_seqlens, cu_seqlens, longest, longest, **kwargs)
    return out.unsqueeze(0)


def _base_attention(module: nn.Module, base: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    """The attention function ``base`` names; for eager, the ``eager_attention_forward`` of the module's model."""
    if base != "eager":
        return ALL_ATTENTION_FUNCTIONS[base]
    for cls in type(module).__mro__:
        eager = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if eager is not None:
            return eager
    raise TypeError(f"attention module {type(module).__name__} has no eager_attention_forward in its modeling file")


def varlen_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    seq_lens: Sequence[int],
    *,
    scaling: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Causal attention of every packed sequence over itself only: one flash-attention varlen launch where
    ``flash_varlen_causal_attention`` applies (and ``dropout`` is 0), else one SDPA call per run of
    equal-length sequences (``sdpa_per_sequence_attention``).

    Args:
        query: ``[1, Hq, T, D]``; key, value: ``[1, Hkv, T, D]`` with ``Hq % Hkv == 0`` (GQA).
        seq_lens: host lengths (>= 0) of the packed sequences, summing to ``T``.
        scaling: softmax scale (default ``D ** -0.5``); dropout: attention dropout probability.
    Returns:
        ``[1, T, Hq, D]`` in ``query.dtype`` (the layout transformers' attention functions return).
    """
    if query.dim() != 4 or query.shape[0] != 1:
        raise ValueError(f"query must be [1, H, T, D] (one packed stream), got {tuple(query.shape)}")
    if sum(seq_lens) != query.shape[2] or any(n < 0 for n in seq_lens):
        raise ValueError(f"seq_lens must be >= 0 and sum to T={query.shape[2]}, got {list(seq_lens)}")
    if dropout == 0.0 and query.shape[2] > 0:
        out = flash_varlen_causal_attention(query, key, value, seq_lens, scaling)
        if out is not None:
            return out
    return sdpa_per_sequence_attention(query, key, value, seq_lens, scaling=scaling, dropout=dropout)


def sdpa_per_sequence_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    seq_lens: Sequence[int],
    *,
    scaling: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """``varlen_causal_attention``'s portable path (same shapes): one causal SDPA call per run of consecutive
    equal-length sequences, batched over the run (a batch of equal lengths costs what padding would)."""
    gqa = key.shape[1] != query.shape[1]
    runs = [(n, len(list(group))) for n, group in itertools.groupby(seq_lens) if n > 0]  # (length, count)
    if not runs:  # no tokens at all
        return value.new_empty((1, 0, query.shape[1], value.shape[-1]))
    sizes = [n * count for n, count in runs]
    outs = []
    for (n, count), q, k, v in zip(runs, query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2),
                                   strict=True):
        # [1, H, count * n, D] -> [count, H, n, D] (a view)
        q, k, v = (x.unflatten(2, (count, n)).squeeze(0).transpose(0, 1) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling,
                                             enable_gqa=gqa)
        outs.append(out.transpose(0, 1).flatten(1, 2).unsqueeze(0))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # one run (e.g. one sequence): no copy
    return out.transpose(1, 2).contiguous()


def _varlen_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    base: str,
    varlen_seq_lens: Sequence[int] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``AttentionInterface`` entry: per-sequence causal attention, or the base implementation."""
    if varlen_seq_lens is None:
        return _base_attention(module, base)(module, query, key, value, attention_mask, **kwargs)
    if kwargs.get("sliding_window") is not None:
        raise ValueError("varlen attention does not support sliding-window layers")
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(f"varlen attention does not support the attention kwarg {name!r}")
    out = varlen_causal_attention(
        query, key, value, varlen_seq_lens, scaling=kwargs.get("scaling"), dropout=kwargs.get("dropout", 0.0)
    )
    return out, None


def _register() -> None:
    """Register each varlen implementation with its base's mask function (the mask of a forward without
    ``varlen_inputs``; with them, transformers passes the prepared placeholder through unbuilt)."""
    for base, name in VARLEN_IMPLEMENTATIONS.items():
        AttentionInterface.register(name, partial(_varlen_attention_forward, base=base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])


_register()


def enable_varlen_attention(model: nn.Module) -> bool:
    """Switch ``model`` (a transformers ``PreTrainedModel``) to the varlen counterpart of its attention.

    Returns True when the model now runs a varlen implementation; False (model unchanged) when its attention
    does not go through transformers' attention interface, is not sdpa / eager, or its decoder (the text model
    of a composite model) has sliding-window layers or soft-capped attention logits.
    Without ``varlen_seq_lens`` the model computes exactly what it did before.
    """
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if not isinstance(impl, str):  # None, or a per-sub-model dict of a composite model
        return False
    if impl in VARLEN_IMPLEMENTATIONS.values():
        return True
    if impl not in VARLEN_IMPLEMENTATIONS or not getattr(model, "_supports_attention_backend", False):
        return False
    text_config = config.get_text_config()  # the decoder's own config (itself, unless the model is composite)
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is not None:
        if any(t != "full_attention" for t in layer_types):
            return False
    elif getattr(text_config, "sliding_window", None) is not None:
        return False
    if getattr(text_config, "attn_logit_softcapping", None) is not None:
        return False
    config._attn_implementation = VARLEN_IMPLEMENTATIONS[impl]
    return True


def varlen_inputs(seq_lens: Sequence[int], device: torch.device) -> dict[str, Any]:
    """Forward kwargs of a varlen forward over trajectories of ``seq_lens`` tokens (host ints, in stream order)
    of a model switched by ``enable_varlen_attention``: the lengths, and an empty bool ``[1, 1, 0, 0]``
    attention mask that transformers takes as already prepared and hands to the layers as is (the varlen
    attention ignores it; an attention that would read it fails on its shape instead of attending across
    trajectories)."""
    return {
        "varlen_seq_lens": tuple(seq_lens),
        "attention_mask": torch.empty((1, 1, 0, 0), dtype=torch.bool, device=device),
    }
