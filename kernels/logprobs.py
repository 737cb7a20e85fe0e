"""Fused LM-head token log-probs and entropy: Triton kernels and their launchers.

Per row ``r`` of ``hidden`` (optionally only rows listed in ``rows``) the logits are
``z = (hidden[r] @ weight.T + bias) / temperature``; the kernels return ``logp = z[target] - lse(z)`` and the
(positive) entropy ``lse(z) - sum(softmax(z) * z)`` without ever holding more than one tile of logits.

Forward (``logprobs_forward``)
    ``_fwd_kernel``: one program per (row tile, vocab split), the splits of a row tile adjacent. Each program
    streams its vocab split tile by tile, computes the logit tile with ``tl.dot`` over H and keeps an online
    (max, sum-exp, sum p*z, target logit) per row. ``_combine_kernel`` merges the splits into lse, logp and
    entropy and scatters them to rows. Everything runs in log2 units (``z2 = z * log2(e)``, exp2 / log2), and
    the lse handed to the backward stays in those units, so the backward's recomputed ``z2 - lse2`` rounds
    like the forward's (a confident row's ``1 - p`` keeps its precision).
Backward (``logprobs_backward``), one vocab chunk ``[v0, v1)`` at a time, in a fixed order:
    ``_dlogits_kernel`` recomputes the logit tiles and writes the chunk's logit gradients ``[K, v1-v0]``
    (input dtype, bounded by ``chunk_bytes``); ``_dw_kernel`` reduces them over all rows into
    ``dweight[v0:v1]`` (and ``dbias``) with an fp32 accumulator and a sequential row loop;
    ``_dh_kernel`` adds ``dlogits @ weight[v0:v1]`` into an fp32 ``[K, H]`` accumulator and, on the last
    chunk, writes ``dhidden`` rows. No atomics anywhere: results are bitwise deterministic. These three
    GEMM-like kernels walk their tiles in grouped order (``_grouped_tile``) for L2 reuse.

Gradient of the logits of one row with upstream grads ``g`` (of logp) and ``e`` (of entropy):
``dz = g * (onehot(target) - p) + e * p * (lse - entropy - z)`` and ``d(hidden @ weight.T + bias) = dz / T``.
Rows whose target equals ``ignore_index`` get logp 0, entropy 0 and no gradient. Logits of ``-inf`` (a
masked vocabulary entry, e.g. a ``-inf`` bias) have p = 0 and add nothing, even when a whole tile or split is
``-inf``; a row whose logits are all ``-inf`` is NaN, as in the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from bao_fast.kernels.logprobs_configs import LogprobTiles, Tile, interpreting, select_tiles

_LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
_LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b``. ``PRECISION == "upcast"``: fp32 operands (Triton's interpreter miscomputes bf16 dots)."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _grouped_tile(num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program in a 1-D grid over ``num_m x num_n`` tiles, walked in column-major
    groups of ``GROUP_M`` row tiles so that programs running together share operand tiles in L2."""
    pid = tl.program_id(0)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % group_rows, (pid % width) // group_rows


@triton.jit
def _row_index(rows_ptr, offs, mask, HAS_ROWS: tl.constexpr):
    """int64 hidden-state rows of compact row positions ``offs``: ``rows[offs]``, or ``offs`` itself; row 0
    where ``mask`` is false, so loads through the result need no mask."""
    if HAS_ROWS:
        return tl.load(rows_ptr + offs, mask=mask, other=0)
    return tl.where(mask, offs, 0).to(tl.int64)


@triton.jit
def _logit_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    row_idx,
    offs_n,
    mask_n,
    H,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    scale,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """fp32 ``[BLOCK_M, BLOCK_N]`` tile of ``(hidden[row_idx] @ weight[offs_n].T + bias) * scale``.

    ``row_idx`` must be in range for every row (``_row_index`` maps padded rows to row 0); padded columns
    (``mask_n`` false) read weight row 0 and hold garbage the caller masks. ``EVEN_K``: ``H % BLOCK_K == 0``,
    so the operand loads carry no predicate at all, which keeps the tile's registers down.
    """
    offs_k = tl.arange(0, BLOCK_K)
    h_rows = h_ptr + row_idx.to(tl.int64)[:, None] * stride_hn
    w_rows = w_ptr + tl.where(mask_n, offs_n, 0).to(tl.int64)[:, None] * stride_wv
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + offs_k
        if EVEN_K:
            a = tl.load(h_rows + kk[None, :] * stride_hh)
            b = tl.load(w_rows + kk[None, :] * stride_wh)
        else:
            a = tl.load(h_rows + kk[None, :] * stride_hh, mask=(kk < H)[None, :], other=0.0)
            b = tl.load(w_rows + kk[None, :] * stride_wh, mask=(kk < H)[None, :], other=0.0)
        acc = _dot(a, tl.trans(b), acc, PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    return acc * scale


@triton.jit
def _fwd_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    tgt_ptr,
    rows_ptr,
    part_ptr,
    K,
    V,
    H,
    split_cols,
    num_splits,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Per-split online statistics of rows ``pid_m`` tile over vocab ``[pid_s*split_cols, +split_cols)``.

    Writes ``part[0..3, pid_s, k]``, all in log2 units (``z2 = z * log2(e)``): (max of z2, sum of
    2^(z2 - max), sum of 2^(z2 - max) * z2, target z2 or 0).
    """
    # A 1-D grid (a 2-D one caps row tiles at 65535); the splits of one row tile run side by side, so they
    # share its hidden rows in L2.
    pid = tl.program_id(0)
    pid_s = pid % num_splits
    pid_m = pid // num_splits
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < K
    row_idx = _row_index(rows_ptr, offs_m, mask_m, HAS_ROWS)
    tgt = tl.load(tgt_ptr + row_idx, mask=mask_m, other=-1).to(tl.int32)  # int32: cheaper 2-D compares

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    z_tgt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    v_lo = pid_s * split_cols
    v_hi = tl.minimum(v_lo + split_cols, V)
    scale = inv_temp * _LOG2E  # the loop works in log2 units: z2 = z * log2(e)
    for v0 in range(v_lo, v_hi, BLOCK_N):
        offs_n = v0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < v_hi
        z2 = _logit_tile(
            h_ptr, w_ptr, b_ptr, row_idx, offs_n, mask_n, H,
            stride_hn, stride_hh, stride_wv, stride_wh, scale,
            HAS_BIAS, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION,
        )  # fmt: skip
        z2 += tl.where(mask_n, 0.0, -1.0e30)[None, :]  # finite: p * z2 stays 0 on padded columns
        m_new = tl.maximum(m_i, tl.max(z2, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: exp2(-inf - -inf) would be NaN
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(z2 - m_ref[:, None])
        s_i = s_i * alpha + tl.sum(p, axis=1)
        if WITH_ENTROPY:
            t_i = t_i * alpha + tl.sum(tl.where(p > 0.0, p * z2, 0.0), axis=1)  # 0 * -inf adds 0
        z_tgt += tl.sum(tl.where(offs_n[None, :] == tgt[:, None], z2, 0.0), axis=1)
        m_i = m_new
    stride_q = num_splits * K
    base = part_ptr + pid_s * K + offs_m
    tl.store(base, m_i, mask=mask_m)
    tl.store(base + stride_q, s_i, mask=mask_m)
    tl.store(base + 2 * stride_q, t_i, mask=mask_m)
    tl.store(base + 3 * stride_q, z_tgt, mask=mask_m)


@triton.jit
def _combine_kernel(
    part_ptr,
    tgt_ptr,
    rows_ptr,
    logp_ptr,
    ent_ptr,
    lse_ptr,
    K,
    num_splits,
    ignore_index,
    HAS_ROWS: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Merge the split statistics: ``lse[k]`` (log2 units), ``logp[row]``, ``entropy[row]`` (0 on ignored
    rows)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < K
    stride_q = num_splits * K
    m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    for s in range(0, num_splits):
        m = tl.maximum(m, tl.load(part_ptr + s * K + offs, mask=mask, other=0.0))
    s_tot = tl.zeros((BLOCK,), dtype=tl.float32)
    t_tot = tl.zeros((BLOCK,), dtype=tl.float32)
    z_tgt = tl.zeros((BLOCK,), dtype=tl.float32)
    m_ref = tl.where(m == float("-inf"), 0.0, m)  # a row of -inf logits: NaN below, not here
    for s in range(0, num_splits):
        ptr = part_ptr + s * K + offs
        scale = tl.exp2(tl.load(ptr, mask=mask, other=0.0) - m_ref)
        s_tot += tl.load(ptr + stride_q, mask=mask, other=1.0) * scale
        if WITH_ENTROPY:
            t_tot += tl.load(ptr + 2 * stride_q, mask=mask, other=0.0) * scale
        z_tgt += tl.load(ptr + 3 * stride_q, mask=mask, other=0.0)
    lse2 = m + tl.log2(s_tot)
    row_idx = _row_index(rows_ptr, offs, mask, HAS_ROWS)
    valid = tl.load(tgt_ptr + row_idx, mask=mask, other=ignore_index) != ignore_index
    tl.store(lse_ptr + offs, lse2, mask=mask)
    tl.store(logp_ptr + row_idx, tl.where(valid, (z_tgt - lse2) * _LN2, 0.0), mask=mask)
    if WITH_ENTROPY:
        tl.store(ent_ptr + row_idx, tl.where(valid, (lse2 - t_tot / s_tot) * _LN2, 0.0), mask=mask)


@triton.jit
def _dlogits_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    tgt_ptr,
    rows_ptr,
    lse_ptr,
    ent_ptr,
    glogp_ptr,
    gent_ptr,
    dl_ptr,
    K,
    v_lo,
    V_CHUNK,
    H,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    stride_dl,
    inv_temp,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    HAS_GENT: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``dl[k, j] = dz / T`` for rows tile ``pid_m`` and chunk columns tile ``pid_n`` (vocab ``v_lo + j``)."""
    pid_m, pid_n = _grouped_tile(tl.cdiv(K, BLOCK_M), tl.cdiv(V_CHUNK, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < K
    offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_j = offs_j < V_CHUNK
    offs_n = v_lo + offs_j
    row_idx = _row_index(rows_ptr, offs_m, mask_m, HAS_ROWS)
    tgt = tl.load(tgt_ptr + row_idx, mask=mask_m, other=ignore_index)
    valid = mask_m & (tgt != ignore_index)
    lse2 = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
    g = tl.where(valid, tl.load(glogp_ptr + row_idx, mask=mask_m, other=0.0), 0.0)

    # Logits in log2 units, scaled exactly as in the forward.
    z2 = _logit_tile(
        h_ptr, w_ptr, b_ptr, row_idx, offs_n, mask_j, H,
        stride_hn, stride_hh, stride_wv, stride_wh, inv_temp * _LOG2E,
        HAS_BIAS, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION,
    )  # fmt: skip
    p = tl.exp2(z2 - lse2[:, None])
    dz = g[:, None] * (tl.where(offs_n[None, :] == tgt.to(tl.int32)[:, None], 1.0, 0.0) - p)
    if HAS_GENT:
        e = tl.where(valid, tl.load(gent_ptr + row_idx, mask=mask_m, other=0.0), 0.0)
        ent = tl.load(ent_ptr + row_idx, mask=mask_m, other=0.0)
        mean_z_minus_z = (lse2[:, None] - z2) * _LN2 - ent[:, None]  # E_p[z] - z, natural units
        dz += e[:, None] * tl.where(p > 0.0, p * mean_z_minus_z, 0.0)  # a -inf logit adds 0, not 0 * inf
    dz = tl.where(valid[:, None] & mask_j[None, :], dz * inv_temp, 0.0)
    out = dl_ptr + offs_m.to(tl.int64)[:, None] * stride_dl + offs_j[None, :]
    tl.store(out, dz.to(dl_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_j[None, :])


@triton.jit
def _dw_kernel(
    dl_ptr,
    h_ptr,
    rows_ptr,
    dw_ptr,
    db_ptr,
    K,
    v_lo,
    V_CHUNK,
    H,
    stride_dl,
    stride_hn,
    stride_hh,
    stride_dwv,
    stride_dwh,
    HAS_ROWS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``dweight[v_lo + j, h] = sum_k dl[k, j] * hidden[row_k, h]``; fp32 accumulator, rows in order."""
    # H = 0 still runs one hidden tile: it writes dbias (logits = bias / T then).
    pid_v, pid_h = _grouped_tile(tl.cdiv(V_CHUNK, BLOCK_V), tl.maximum(tl.cdiv(H, BLOCK_H), 1), GROUP_M)
    offs_j = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_j = offs_j < V_CHUNK
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32)
    bacc = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for r0 in range(0, K, BLOCK_R):
        rr = r0 + offs_r
        mask_r = rr < K
        row_idx = _row_index(rows_ptr, rr, mask_r, HAS_ROWS)
        dl = tl.load(
            dl_ptr + rr.to(tl.int64)[:, None] * stride_dl + offs_j[None, :],
            mask=mask_r[:, None] & mask_j[None, :],
            other=0.0,
        )
        h = tl.load(
            h_ptr + row_idx.to(tl.int64)[:, None] * stride_hn + offs_h[None, :] * stride_hh,
            mask=mask_r[:, None] & mask_h[None, :],
            other=0.0,
        )
        acc = _dot(tl.trans(dl), h, acc, PRECISION)
        if HAS_BIAS:
            bacc += tl.sum(dl.to(tl.float32), axis=0)
    offs_v = v_lo + offs_j
    out = dw_ptr + offs_v.to(tl.int64)[:, None] * stride_dwv + offs_h[None, :] * stride_dwh
    tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=mask_j[:, None] & mask_h[None, :])
    if HAS_BIAS:  # noqa: SIM102 (constexpr test, then a runtime one)
        if pid_h == 0:
            tl.store(db_ptr + offs_v, bacc, mask=mask_j)


@triton.jit
def _dh_kernel(
    dl_ptr,
    w_ptr,
    rows_ptr,
    acc_ptr,
    dh_ptr,
    K,
    v_lo,
    V_CHUNK,
    H,
    stride_dl,
    stride_wv,
    stride_wh,
    stride_dhn,
    stride_dhh,
    HAS_ROWS: tl.constexpr,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_V: tl.constexpr,
    GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``acc[k, h] (+)= sum_j dl[k, j] * weight[v_lo + j, h]``; the last chunk writes ``dhidden[row_k, h]``."""
    pid_m, pid_h = _grouped_tile(tl.cdiv(K, BLOCK_M), tl.cdiv(H, BLOCK_H), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < K
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    mask = mask_m[:, None] & mask_h[None, :]
    acc_ptrs = acc_ptr + offs_m.to(tl.int64)[:, None] * H + offs_h[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32) if FIRST else tl.load(acc_ptrs, mask=mask, other=0.0)
    offs_j = tl.arange(0, BLOCK_V)
    dl_rows = dl_ptr + offs_m.to(tl.int64)[:, None] * stride_dl
    for j0 in range(0, V_CHUNK, BLOCK_V):
        jj = j0 + offs_j
        mask_j = jj < V_CHUNK
        dl = tl.load(dl_rows + jj[None, :], mask=mask_m[:, None] & mask_j[None, :], other=0.0)
        w = tl.load(
            w_ptr + (v_lo + jj).to(tl.int64)[:, None] * stride_wv + offs_h[None, :] * stride_wh,
            mask=mask_j[:, None] & mask_h[None, :],
            other=0.0,
        )
        acc = _dot(dl, w, acc, PRECISION)
    if LAST:
        row_idx = _row_index(rows_ptr, offs_m, mask_m, HAS_ROWS)
        out = dh_ptr + row_idx.to(tl.int64)[:, None] * stride_dhn + offs_h[None, :] * stride_dhh
        tl.store(out, acc.to(dh_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(acc_ptrs, acc, mask=mask)


def _precision(dtype: torch.dtype) -> str:
    """fp32 operands get IEEE products (matching torch's default matmul); 16-bit ones use tensor cores
    ("tf32" is ignored for them), except bf16 under the interpreter, which is upcast (see ``_dot``)."""
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if dtype == torch.bfloat16 and interpreting() else "tf32"


def _launch(tile: Tile) -> dict[str, int]:
    return {"num_warps": tile.num_warps, "num_stages": tile.num_stages}


def _num_rows(rows: torch.Tensor | None, n: int) -> int:
    return n if rows is None else rows.shape[0]


def _default_splits(device: torch.device, vocab_tiles: int, divisor: int) -> int:
    """Vocab splits of the forward (one on the interpreter): about ``SMs / divisor``. With the default 8 the
    programs running together cover ~8 row tiles x all splits, so their hidden rows and weight tiles both
    stay in L2, and the grid has ``splits x row tiles`` programs to fill the GPU even for short batches."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(vocab_tiles, sms // divisor))


def logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    rows: torch.Tensor | None,
    *,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
    tiles: LogprobTiles | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernels. Inputs are validated by the caller (``bao_fast.ops.token_logprobs``).

    Args: hidden ``[N, H]``, weight ``[V, H]`` (same float dtype), bias ``[V]`` or None, targets int64 ``[N]``,
    rows int64 ``[K]`` (unique row indices) or None for all rows; ``num_splits`` overrides the vocab split.
    Returns: logp f32 ``[N]``, entropy f32 ``[N]`` (``[0]`` without ``with_entropy``), lse f32 ``[K]`` in log2
    units (``logsumexp(z) * log2(e)``, what ``logprobs_backward`` takes); rows outside ``rows`` hold 0.
    """
    n, h = hidden.shape
    v = weight.shape[0]
    k = _num_rows(rows, n)
    tiles = tiles or select_tiles(hidden.device, hidden.dtype)
    t = tiles.fwd
    row_tiles = triton.cdiv(k, t.block_m)
    vocab_tiles = triton.cdiv(v, t.block_n)
    splits = num_splits or _default_splits(hidden.device, vocab_tiles, tiles.fwd_split_divisor)
    split_cols = triton.cdiv(vocab_tiles, splits) * t.block_n
    splits = triton.cdiv(v, split_cols)
    alloc = torch.empty if rows is None else torch.zeros
    logp = alloc(n, device=hidden.device, dtype=torch.float32)
    entropy = alloc(n if with_entropy else 0, device=hidden.device, dtype=torch.float32)
    lse = torch.empty(k, device=hidden.device, dtype=torch.float32)
    if k == 0:
        return logp, entropy, lse
    part = torch.empty(4, splits, k, device=hidden.device, dtype=torch.float32)
    rows_arg = rows if rows is not None else targets
    _fwd_kernel[(splits * row_tiles,)](
        hidden, weight, bias if bias is not None else weight, targets, rows_arg, part,
        k, v, h, split_cols, splits,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), 1.0 / temperature,
        HAS_BIAS=bias is not None, HAS_ROWS=rows is not None, WITH_ENTROPY=with_entropy,
        EVEN_K=h % t.block_k == 0, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
        PRECISION=_precision(hidden.dtype),
        **_launch(t),
    )  # fmt: skip
    block = 128
    _combine_kernel[(triton.cdiv(k, block),)](
        part, targets, rows_arg, logp, entropy if with_entropy else logp, lse,
        k, splits, ignore_index,
        HAS_ROWS=rows is not None, WITH_ENTROPY=with_entropy, BLOCK=block,
    )  # fmt: skip
    return logp, entropy, lse


def _chunk_cols(k: int, v: int, itemsize: int, tiles: LogprobTiles) -> int:
    """Vocab columns per backward chunk: the ``[K, cols]`` gradient buffer fits ``tiles.chunk_bytes``."""
    step = max(tiles.dlogits.block_n, tiles.dw.block_m)
    cols = tiles.chunk_bytes // max(1, k * itemsize) // step * step
    return max(step, min(cols, triton.cdiv(v, step) * step))


def logprobs_backward(
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    rows: torch.Tensor | None,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    *,
    temperature: float,
    ignore_index: int,
    need_dhidden: bool = True,
    need_dweight: bool = True,
    tiles: LogprobTiles | None = None,
    chunk_cols: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward kernels: returns dhidden ``[N, H]`` (hidden dtype), dweight ``[V, H]`` (weight
    dtype, fp32-accumulated over all rows) and dbias f32 ``[V]`` (None without bias).

    ``grad_logp`` / ``grad_entropy``: f32 ``[N]`` upstream grads (``grad_entropy`` None when entropy gets no
    gradient; then ``entropy`` may be None). ``lse``: f32 ``[K]`` from the forward (log2 units). ``need_dhidden`` /
    ``need_dweight`` (the latter also covers dbias): skip the other kernel and return None in its place.
    ``chunk_cols`` overrides the vocab chunk (a multiple of the tiles' vocab blocks).
    """
    n, h = hidden.shape
    v = weight.shape[0]
    k = _num_rows(rows, n)
    tiles = tiles or select_tiles(hidden.device, hidden.dtype)
    dh = dw = db = None
    if need_dhidden:
        dh = (torch.empty if rows is None and k > 0 else torch.zeros)(n, h, device=hidden.device, dtype=hidden.dtype)
    if need_dweight:
        alloc = torch.empty if k > 0 else torch.zeros
        dw = alloc(v, h, device=weight.device, dtype=weight.dtype)
        db = alloc(v, device=weight.device, dtype=torch.float32) if bias is not None else None
    if k == 0 or not (need_dhidden or need_dweight):
        return dh, dw, db
    cols = chunk_cols or _chunk_cols(k, v, hidden.element_size(), tiles)
    dl = torch.empty(k, min(cols, v), device=hidden.device, dtype=hidden.dtype)
    acc = torch.empty(k, h, device=hidden.device, dtype=torch.float32) if need_dhidden and cols < v else dl
    rows_arg = rows if rows is not None else targets
    has_gent = grad_entropy is not None
    prec = _precision(hidden.dtype)
    td, tw, th = tiles.dlogits, tiles.dw, tiles.dh
    for v0 in range(0, v, cols):
        vc = min(cols, v - v0)
        _dlogits_kernel[(triton.cdiv(k, td.block_m) * triton.cdiv(vc, td.block_n),)](
            hidden, weight, bias if bias is not None else weight, targets, rows_arg, lse,
            entropy if has_gent else lse, grad_logp, grad_entropy if has_gent else grad_logp, dl,
            k, v0, vc, h,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), dl.stride(0),
            1.0 / temperature, ignore_index,
            HAS_BIAS=bias is not None, HAS_ROWS=rows is not None, HAS_GENT=has_gent,
            EVEN_K=h % td.block_k == 0, BLOCK_M=td.block_m, BLOCK_N=td.block_n, BLOCK_K=td.block_k,
            GROUP_M=td.group_m, PRECISION=prec,
            **_launch(td),
        )  # fmt: skip
        if dw is not None:
            _dw_kernel[(triton.cdiv(vc, tw.block_m) * max(1, triton.cdiv(h, tw.block_n)),)](
                dl, hidden, rows_arg, dw, db if db is not None else lse,
                k, v0, vc, h,
                dl.stride(0), hidden.stride(0), hidden.stride(1), dw.stride(0), dw.stride(1),
                HAS_ROWS=rows is not None, HAS_BIAS=bias is not None,
                BLOCK_V=tw.block_m, BLOCK_H=tw.block_n, BLOCK_R=tw.block_k, GROUP_M=tw.group_m, PRECISION=prec,
                **_launch(tw),
            )  # fmt: skip
        if dh is not None:
            _dh_kernel[(triton.cdiv(k, th.block_m) * triton.cdiv(h, th.block_n),)](
                dl, weight, rows_arg, acc, dh,
                k, v0, vc, h,
                dl.stride(0), weight.stride(0), weight.stride(1), dh.stride(0), dh.stride(1),
                HAS_ROWS=rows is not None, FIRST=v0 == 0, LAST=v0 + cols >= v,
                BLOCK_M=th.block_m, BLOCK_H=th.block_n, BLOCK_V=th.block_k, GROUP_M=th.group_m, PRECISION=prec,
                **_launch(th),
            )  # fmt: skip
    return dh, dw, db
