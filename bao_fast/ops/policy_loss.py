"""``clipped_ratio_loss``: PPO/GRPO clipped-ratio policy loss over packed sequences (verl semantics), fused
forward + backward.

Per token j (all quantities float[T]):
ρ = exp(clamp(logp - old_logp, -20, 20)); pg1 = -A ρ; pg2 = -A clip(ρ, 1 - clip_low, 1 + clip_high);
pg = max(pg1, pg2); for A < 0: pg = min(pg, -A · dual_clip); l = pg + kl_coef · kl with, to ``ref_logp``,
k1 = logp - ref, k2 = (logp - ref)² / 2, k3 = e^x - x - 1 with x = ref - logp clamped to [-10, 10]
(the clamp bounds the log-ratio, unlike verl's ``low_var_kl``, which clamps the result).

Aggregation over the masked tokens (sequences from ``cu_seqlens``):
* ``token-mean``: Σ l / Σ mask;
* ``seq-mean-token-mean``: mean over the sequences with at least one masked token of their token means
  (sequences without one are left out of the mean);
* ``seq-mean-token-sum``: Σ_s (Σ_{j∈s} l) / num_seqs (every sequence counts, empty ones included);
* ``seq-mean-token-sum-norm``: Σ_s (Σ_{j∈s} l) / norm_length, as verl's ``agg_loss`` (Dr.GRPO: a constant
  normaliser, not divided by the number of sequences).
With no masked token the loss is 0. Stats are masked token means whatever ``agg`` is: clipfrac
(pg2 > pg1), clipfrac_lower (A < 0 and the dual clip is active), approx_kl = mean(old_logp - logp) (k1 of
the behaviour policy), kl (the chosen estimator to ``ref_logp``, 0 without it).

The gradient flows to ``logp`` only (old_logp, advantages and ref_logp are data). The forward writes
d loss / d logp; the backward scales it by the incoming gradient. CUDA runs the Triton kernels of
``bao_fast.kernels.policy_loss`` with no host synchronisation; the CPU runs the torch code below.
"""

from __future__ import annotations

import itertools
import math

import torch

from bao_fast.algo.loss import AGGREGATIONS, KL_TYPES

__all__ = ["STAT_NAMES", "clipped_ratio_loss", "clipped_ratio_loss_torch"]

STAT_NAMES: tuple[str, ...] = ("clipfrac", "clipfrac_lower", "approx_kl", "kl")


def _validate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    clip_low: float,
    clip_high: float,
    dual_clip: float,
    kl_coef: float,
    kl_type: str,
    agg: str,
    norm_length: float | None,
) -> None:
    if not isinstance(logp, torch.Tensor):
        raise TypeError(f"logp must be a torch.Tensor, got {type(logp).__name__}")
    if logp.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"logp must be float32 or float64, got {logp.dtype}")
    if logp.dim() != 1:
        raise ValueError(f"logp must be 1-D [T] (packed tokens), got shape {tuple(logp.shape)}")
    tensors = {"old_logp": old_logp, "advantages": advantages, "mask": mask, "ref_logp": ref_logp}
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        expected = torch.bool if name == "mask" else logp.dtype
        if tensor.dtype != expected:
            raise TypeError(f"{name} must have dtype {expected}, got {tensor.dtype}")
        if tensor.shape != logp.shape:
            raise ValueError(f"{name} must have logp's shape {tuple(logp.shape)}, got {tuple(tensor.shape)}")
        if tensor.device != logp.device:
            raise ValueError(f"{name} is on {tensor.device}, expected {logp.device} (logp's device)")
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
    if kl_type not in KL_TYPES:
        raise ValueError(f"kl_type must be one of {KL_TYPES}, got {kl_type!r}")
    scalars = {"clip_low": clip_low, "clip_high": clip_high, "dual_clip": dual_clip, "kl_coef": kl_coef}
    if norm_length is not None:
        scalars["norm_length"] = norm_length
    for name, value in scalars.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
        if name != "dual_clip" and not -math.inf < value < math.inf:  # SymFloat-safe (torch.compile dynamic)
            raise ValueError(f"{name} must be finite, got {value}")
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low and clip_high must be >= 0, got {clip_low} and {clip_high}")
    if not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (inf disables it), got {dual_clip}")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0 and ref_logp is None:
        raise ValueError("ref_logp is required when kl_coef > 0")
    if agg == "seq-mean-token-sum-norm" and (norm_length is None or norm_length <= 0):
        raise ValueError(f"norm_length must be > 0 when agg is 'seq-mean-token-sum-norm', got {norm_length}")
    if cu_seqlens is None:
        if agg != "token-mean":
            raise ValueError(f"cu_seqlens is required when agg is {agg!r}")
        return
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise TypeError("cu_seqlens must be a 1-D int32 tensor [B+1]")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must have B+1 >= 2 entries, got {cu_seqlens.numel()}")
    if cu_seqlens.device != logp.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, expected {logp.device} (logp's device)")
    if logp.device.type != "cuda" and not torch.compiler.is_compiling():
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != logp.numel() or any(a > b for a, b in itertools.pairwise(bounds)):
            raise ValueError(f"cu_seqlens must rise from 0 to T = {logp.numel()}, got {bounds}")


def clipped_ratio_loss_torch(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    clip_low: float,
    clip_high: float,
    dual_clip: float,
    kl_coef: float,
    kl_type: str,
    agg: str,
    norm_length: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vectorised torch forward + analytic backward (the CPU path). Returns (loss 0-dim, d loss / d logp [T],
    stats [4] in ``STAT_NAMES`` order), in the dtype of ``logp``."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
    d_ratio = torch.where((log_ratio >= -20.0) & (log_ratio <= 20.0), ratio, 0.0)
    lower, upper = 1.0 - clip_low, 1.0 + clip_high
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(lower, upper)
    clipped = pg2 > pg1
    pg = torch.where(clipped, pg2, pg1)
    d_pg1 = -advantages * d_ratio
    d_pg = torch.where(clipped & ((ratio < lower) | (ratio > upper)), 0.0, d_pg1)
    pg3 = -advantages * dual_clip
    dual = (advantages < 0) & (pg3 < pg)
    loss = torch.where(dual, pg3, pg)
    d_loss = torch.where(dual, 0.0, d_pg)

    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        diff = logp - ref_logp
        if kl_type == "k1":
            kl, d_kl = diff, torch.ones_like(diff)
        elif kl_type == "k2":
            kl, d_kl = 0.5 * diff * diff, diff
        else:
            x = (-diff).clamp(-10.0, 10.0)
            kl = torch.exp(x) - x - 1.0
            d_kl = torch.where((diff >= -10.0) & (diff <= 10.0), 1.0 - torch.exp(x), 0.0)
        loss = loss + kl_coef * kl
        d_loss = d_loss + kl_coef * d_kl

    count = mask.sum(dtype=logp.dtype)
    if agg == "token-mean":
        weight = 1.0 / count.clamp(min=1.0)
    elif agg == "seq-mean-token-sum":
        weight = torch.tensor(1.0 / (cu_seqlens.numel() - 1), dtype=logp.dtype, device=logp.device)
    elif agg == "seq-mean-token-sum-norm":
        weight = torch.tensor(1.0 / norm_length, dtype=logp.dtype, device=logp.device)
    else:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=logp.device), lengths)
        per_seq = torch.zeros(lengths.numel(), dtype=logp.dtype, device=logp.device)
        per_seq.index_add_(0, seq, mask.to(logp.dtype))
        non_empty = (per_seq > 0).sum(dtype=logp.dtype).clamp(min=1.0)
        weight = torch.where(per_seq > 0, 1.0 / (per_seq.clamp(min=1.0) * non_empty), 0.0)[seq]
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    total = torch.where(mask, weight * loss, zero).sum()
    grad = torch.where(mask, weight * d_loss, zero)
    denom = count.clamp(min=1.0)
    stats = torch.stack(
        [
            (clipped & mask).sum(dtype=logp.dtype) / denom,
            (dual & mask).sum(dtype=logp.dtype) / denom,
            torch.where(mask, old_logp - logp, zero).sum() / denom,
            torch.where(mask, kl, zero).sum() / denom,
        ]
    )
    return total, grad, stats


@torch.library.custom_op("bao_fast::clipped_ratio_loss", mutates_args=())
def _clipped_ratio_loss_op(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    clip_low: float,
    clip_high: float,
    dual_clip: float,
    kl_coef: float,
    kl_type: str,
    agg: str,
    norm_length: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (logp, old_logp, advantages, mask, cu_seqlens, ref_logp)
    options = (clip_low, clip_high, dual_clip, kl_coef, kl_type, agg, norm_length)
    if logp.device.type == "cuda":
        from bao_fast.kernels.policy_loss import clipped_ratio_loss_triton

        with torch.cuda.device(logp.device):  # Triton launches on the current device, not the tensors'
            return clipped_ratio_loss_triton(*(a.contiguous() if a is not None else None for a in args), *options)
    return clipped_ratio_loss_torch(*args, *options)


@_clipped_ratio_loss_op.register_fake
def _(logp, old_logp, advantages, mask, cu_seqlens, ref_logp, *_options):
    return logp.new_empty(()), torch.empty_like(logp), logp.new_empty(len(STAT_NAMES))


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss, _grad_grad, _grad_stats):
    if torch.is_grad_enabled():  # create_graph=True: the saved d loss / d logp has no derivative of its own
        raise RuntimeError("clipped_ratio_loss does not support double backward (create_graph=True)")
    (grad_logp,) = ctx.saved_tensors
    return (grad_loss * grad_logp,) + (None,) * 12


_clipped_ratio_loss_op.register_autograd(_backward, setup_context=_setup_context)


def clipped_ratio_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float = 3.0,
    kl_coef: float = 0.0,
    kl_type: str = "k3",
    agg: str = "token-mean",
    norm_length: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-ratio policy loss of packed tokens (semantics in the module docstring).

    Args: logp float32/float64[T] (differentiable), old_logp, advantages (, ref_logp) of the same dtype and
    shape, mask bool[T] (trained tokens), cu_seqlens int32[B+1] (B >= 1, required by the seq-* aggregations).
    Scalars are Python floats: clip_low, clip_high >= 0; dual_clip > 1 (inf disables it); kl_coef >= 0 (> 0
    needs ref_logp); norm_length > 0 and finite (required by seq-mean-token-sum-norm).
    Returns (loss 0-dim tensor in logp's dtype, stats dict ``STAT_NAMES`` -> detached 0-dim tensors).
    Differentiable once: double backward (``create_graph=True``) raises a RuntimeError.
    """
    _validate(
        logp, old_logp, advantages, mask, cu_seqlens, ref_logp,
        clip_low, clip_high, dual_clip, kl_coef, kl_type, agg, norm_length,
    )  # fmt: skip
    loss, _, stats = _clipped_ratio_loss_op(
        logp, old_logp, advantages, mask, cu_seqlens, ref_logp,
        float(clip_low), float(clip_high), float(dual_clip), float(kl_coef), kl_type, agg,
        None if norm_length is None else float(norm_length),
    )  # fmt: skip
    stats = stats.detach()
    return loss, {name: stats[i] for i, name in enumerate(STAT_NAMES)}
