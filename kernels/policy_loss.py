"""Triton kernels of ``clipped_ratio_loss``: fused forward + backward of the clipped-ratio surrogate with
asymmetric and dual clip, optional KL to a reference policy, four aggregations over packed sequences.

One pass over the tokens writes d loss / d logp (already weighted by the aggregation) and per-block partial
sums of the loss and of the statistics; a deterministic ``torch.sum`` over the blocks finishes them. The
aggregation weight of a token is known before that pass:

* token-mean: 1 / Σ mask (one ``mask.sum()`` on the device);
* seq-mean-token-mean: 1 / (n_s · #non-empty sequences), n_s from ``_seq_mask_count_kernel``, and the
  token's sequence found by a vectorised binary search in ``cu_seqlens``;
* seq-mean-token-sum: 1 / num_seqs; seq-mean-token-sum-norm: 1 / norm_length (device fills).

Traffic per token: logp, old_logp, advantages (+ ref_logp) read, mask read, gradient written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TOKEN_BLOCK = 2048
LOSS_NUM_WARPS = 8  # 8 tokens of a block per thread: float64 fits its registers (4 warps spill)
SEQ_BLOCK = 1024
NUM_STATS = 6  # loss, masked tokens, clipped, dual-clipped, Σ (old_logp - logp), Σ kl
_KL_CODES = {"k1": 0, "k2": 1, "k3": 2}


@triton.jit
def _seq_mask_count_kernel(mask_ptr, cu_seqlens_ptr, counts_ptr, BLOCK: tl.constexpr):
    """counts[s] = Σ mask over tokens cu_seqlens[s]:cu_seqlens[s+1] (one program per sequence)."""
    s = tl.program_id(0)
    lo = tl.load(cu_seqlens_ptr + s)
    hi = tl.load(cu_seqlens_ptr + s + 1)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(mask_ptr + offs, mask=offs < hi, other=0).to(tl.int32)
    tl.store(counts_ptr + s, tl.sum(acc, axis=0))


@triton.jit
def _sequence_of(pos, cu_seqlens_ptr, num_seqs, search_steps):
    """Index s of the sequence holding each position: the largest s with cu_seqlens[s] <= pos (empty
    sequences are skipped), by ``search_steps`` = ceil(log2(num_seqs)) bisections that keep
    cu_seqlens[lo] <= pos < cu_seqlens[hi] (a bisection of a settled lane changes nothing)."""
    lo = tl.zeros_like(pos).to(tl.int32)
    hi = lo + num_seqs
    for _ in range(0, search_steps):
        mid = (lo + hi) // 2
        go_right = tl.load(cu_seqlens_ptr + mid) <= pos
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    return lo


@triton.jit
def _clipped_ratio_loss_kernel(
    logp_ptr,
    old_logp_ptr,
    adv_ptr,
    mask_ptr,
    ref_logp_ptr,
    cu_seqlens_ptr,
    weight_ptr,
    grad_ptr,
    partials_ptr,
    num_tokens,
    num_seqs,
    search_steps,
    clip_low: tl.float64,
    clip_high: tl.float64,
    dual_clip: tl.float64,
    kl_coef: tl.float64,
    HAS_REF: tl.constexpr,
    KL_TYPE: tl.constexpr,
    PER_SEQ_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per token: loss l_j, dl_j/dlogp_j, weight w_j (weight_ptr[0], or weight_ptr[sequence] when
    PER_SEQ_WEIGHT); writes grad_j = mask_j w_j dl_j and NUM_STATS partial
    sums (fp64) of this block: Σ w l, Σ mask, Σ clipped, Σ dual-clipped, Σ (old - logp), Σ kl. The
    coefficients arrive as fp64 and become constants of the log-probs' dtype (a float argument would be fp32,
    which moved fp64 clip boundaries)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_t = offs < num_tokens
    m = (tl.load(mask_ptr + offs, mask=in_t, other=0) != 0) & in_t
    logp = tl.load(logp_ptr + offs, mask=in_t, other=0.0)
    old_logp = tl.load(old_logp_ptr + offs, mask=in_t, other=0.0)
    adv = tl.load(adv_ptr + offs, mask=in_t, other=0.0)

    log_ratio = logp - old_logp
    ratio = tl.exp(tl.minimum(tl.maximum(log_ratio, -20.0), 20.0))
    d_ratio = tl.where((log_ratio >= -20.0) & (log_ratio <= 20.0), ratio, 0.0)
    lower = tl.full([], 1.0 - clip_low, logp.dtype)
    upper = tl.full([], 1.0 + clip_high, logp.dtype)
    pg1 = -adv * ratio
    pg2 = -adv * tl.minimum(tl.maximum(ratio, lower), upper)
    clipped = pg2 > pg1
    pg = tl.where(clipped, pg2, pg1)
    d_pg1 = -adv * d_ratio
    d_pg = tl.where(clipped, tl.where((ratio >= lower) & (ratio <= upper), d_pg1, 0.0), d_pg1)
    pg3 = -adv * tl.full([], dual_clip, logp.dtype)
    dual = (adv < 0.0) & (pg3 < pg)
    loss = tl.where(dual, pg3, pg)
    d_loss = tl.where(dual, 0.0, d_pg)

    kl = tl.zeros_like(logp)
    if HAS_REF:
        diff = logp - tl.load(ref_logp_ptr + offs, mask=in_t, other=0.0)
        if KL_TYPE == 0:
            kl = diff
            d_kl = tl.full(diff.shape, 1.0, diff.dtype)
        elif KL_TYPE == 1:
            kl = 0.5 * diff * diff
            d_kl = diff
        else:
            x = tl.minimum(tl.maximum(-diff, -10.0), 10.0)
            e = tl.exp(x)
            kl = e - x - 1.0
            d_kl = tl.where((diff >= -10.0) & (diff <= 10.0), 1.0 - e, 0.0)
        kl_c = tl.full([], kl_coef, logp.dtype)
        loss += kl_c * kl
        d_loss += kl_c * d_kl

    if PER_SEQ_WEIGHT:
        w = tl.load(weight_ptr + _sequence_of(offs, cu_seqlens_ptr, num_seqs, search_steps), mask=m, other=0.0)
    else:
        w = tl.load(weight_ptr)
    tl.store(grad_ptr + offs, tl.where(m, w * d_loss, 0.0).to(logp.dtype), mask=in_t)

    out = partials_ptr + pid * 6
    tl.store(out + 0, tl.sum(tl.where(m, w * loss, 0.0).to(tl.float64), axis=0))
    tl.store(out + 1, tl.sum(m.to(tl.float64), axis=0))
    tl.store(out + 2, tl.sum((m & clipped).to(tl.float64), axis=0))
    tl.store(out + 3, tl.sum((m & dual).to(tl.float64), axis=0))
    tl.store(out + 4, tl.sum(tl.where(m, old_logp - logp, 0.0).to(tl.float64), axis=0))
    tl.store(out + 5, tl.sum(tl.where(m, kl, 0.0).to(tl.float64), axis=0))


def _token_weights(
    mask: torch.Tensor, cu_seqlens: torch.Tensor | None, agg: str, norm_length: float | None, dtype: torch.dtype
) -> torch.Tensor:
    """Aggregation weights on the device: one scalar [1] for every token, or one per sequence [B]
    (seq-mean-token-mean). Built from device reductions and fills only: no host synchronisation."""
    device = mask.device
    if agg == "token-mean":
        return (1.0 / mask.sum(dtype=dtype).clamp(min=1.0)).reshape(1)
    if agg == "seq-mean-token-sum":
        return torch.full((1,), 1.0 / (cu_seqlens.numel() - 1), dtype=dtype, device=device)
    if agg == "seq-mean-token-sum-norm":
        return torch.full((1,), 1.0 / norm_length, dtype=dtype, device=device)
    num_seqs = cu_seqlens.numel() - 1
    counts = torch.empty(num_seqs, dtype=torch.int32, device=device)
    _seq_mask_count_kernel[(num_seqs,)](mask.view(torch.uint8), cu_seqlens, counts, BLOCK=SEQ_BLOCK)
    counts = counts.to(dtype)
    non_empty = (counts > 0).sum(dtype=dtype).clamp(min=1.0)
    return torch.where(counts > 0, 1.0 / (counts.clamp(min=1.0) * non_empty), 0.0)


def clipped_ratio_loss_triton(
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
    """Launch the fused loss. Inputs validated and contiguous: logp, old_logp, advantages (, ref_logp)
    float[T] of one dtype, mask bool[T], cu_seqlens int32[B+1] (needed by the seq-* aggregations).

    Returns (loss 0-dim, d loss / d logp [T], stats [4] = clipfrac, clipfrac_lower, approx_kl, kl), in the
    dtype of ``logp``.
    """
    num_tokens = logp.numel()
    num_seqs = cu_seqlens.numel() - 1 if cu_seqlens is not None else 0
    weights = _token_weights(mask, cu_seqlens, agg, norm_length, logp.dtype)
    num_blocks = max(triton.cdiv(num_tokens, TOKEN_BLOCK), 1)
    grad = torch.empty_like(logp)
    partials = torch.empty(num_blocks, NUM_STATS, dtype=torch.float64, device=logp.device)
    _clipped_ratio_loss_kernel[(num_blocks,)](
        logp,
        old_logp,
        advantages,
        mask.view(torch.uint8),
        ref_logp if ref_logp is not None else logp,
        cu_seqlens if cu_seqlens is not None else mask,
        weights,
        grad,
        partials,
        num_tokens,
        num_seqs,
        max(num_seqs - 1, 1).bit_length(),
        clip_low,
        clip_high,
        dual_clip,
        kl_coef,
        HAS_REF=ref_logp is not None,
        KL_TYPE=_KL_CODES[kl_type],
        PER_SEQ_WEIGHT=agg == "seq-mean-token-mean",
        BLOCK=TOKEN_BLOCK,
        num_warps=LOSS_NUM_WARPS,
    )
    totals = partials.sum(dim=0)
    stats = totals[2:] / totals[1].clamp(min=1.0)
    return totals[0].to(logp.dtype), grad, stats.to(logp.dtype)
