"""Chunked pure-PyTorch token log-probs (the CPU path of ``bao_fast.ops.token_logprobs``).

Same semantics as the Triton kernels in ``bao_fast.kernels.logprobs``: the logits
``z = (hidden @ weight.T + bias) / temperature`` are built one ``[row_chunk, col_chunk]`` fp32 tile at a time
with an online logsumexp over vocab tiles, so peak extra memory is a few tiles plus the fp32 dweight
accumulator, never ``[N, V]``. Logits of ``-inf`` (a masked vocabulary entry) have p = 0 and add nothing,
even when a whole tile is ``-inf``. Inputs are validated by the caller.
"""

from __future__ import annotations

import torch

TILE_BYTES = 4 << 20
"""Bytes of one fp32 logit tile; a few such tiles are alive at once. Small enough for the elementwise passes
over a tile to stay in cache: at N=2048, H=512, V=32000 on 2 EPYC cores (1 MiB L2 each, 32 MiB L3),
512 x 2048 tiles ran fwd+bwd in 1.42-1.45 s vs 1.88-1.96 s for 1024 x 8192 (32 MiB) ones; 512 x 1024,
256 x 2048, 256 x 1024 and 128 x 1024 tiles were within 3% or slower. What remains is the four GEMMs."""
ROW_CHUNK = 512
"""Rows per tile."""


def _tile_shape(k: int, v: int, tile_bytes: int, row_chunk: int) -> tuple[int, int]:
    rows = max(1, min(k, row_chunk))
    cols = max(1, min(v, tile_bytes // (4 * rows)))
    return rows, cols


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, v0: int, v1: int, inv_temp: float):
    """fp32 ``[R, v1 - v0]`` logits of rows ``h`` (fp32) against vocab ``[v0, v1)``."""
    z = h @ weight[v0:v1].float().T
    if bias is not None:
        z += bias[v0:v1].float()
    return z.mul_(inv_temp)


def _row_index(rows: torch.Tensor | None, r0: int, r1: int) -> torch.Tensor | slice:
    return slice(r0, r1) if rows is None else rows[r0:r1]


def chunked_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    rows: torch.Tensor | None,
    *,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
    tile_bytes: int = TILE_BYTES,
    row_chunk: int = ROW_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns logp f32 ``[N]``, entropy f32 ``[N]`` (``[0]`` without ``with_entropy``) and lse f32 ``[K]``
    (``K = len(rows)``, or N); rows outside ``rows`` and ignored rows hold 0. Tiles are at most
    ``row_chunk`` rows by ``tile_bytes`` of fp32 logits."""
    n = hidden.shape[0]
    v = weight.shape[0]
    k = n if rows is None else rows.shape[0]
    inv_temp = 1.0 / temperature
    logp = hidden.new_zeros(n, dtype=torch.float32)
    entropy = hidden.new_zeros(n if with_entropy else 0, dtype=torch.float32)
    lse = hidden.new_empty(k, dtype=torch.float32)
    row_chunk, col_chunk = _tile_shape(k, v, tile_bytes, row_chunk)
    for r0 in range(0, k, row_chunk):
        r1 = min(r0 + row_chunk, k)
        idx = _row_index(rows, r0, r1)
        h = hidden[idx].float()
        tgt = targets[idx]
        m = h.new_full((r1 - r0,), float("-inf"))
        s = h.new_zeros(r1 - r0)
        t = h.new_zeros(r1 - r0)
        z_tgt = h.new_zeros(r1 - r0)
        for v0 in range(0, v, col_chunk):
            v1 = min(v0 + col_chunk, v)
            z = _logits(h, weight, bias, v0, v1, inv_temp)
            m_new = torch.maximum(m, z.amax(dim=1))
            m_ref = m_new.masked_fill(m_new == float("-inf"), 0.0)  # all -inf so far: exp(-inf - -inf) is NaN
            alpha = torch.exp(m - m_ref)
            p = torch.exp(z - m_ref[:, None])
            s = s * alpha + p.sum(dim=1)
            in_tile = (tgt >= v0) & (tgt < v1)
            local = torch.where(in_tile, tgt - v0, 0)
            z_tgt += torch.where(in_tile, z.gather(1, local[:, None]).squeeze(1), 0.0)
            if with_entropy:  # z is not read again: zeroed where p = 0, so that 0 * -inf adds 0
                t = t * alpha + torch.linalg.vecdot(p, z.masked_fill_(p == 0, 0.0))
            m = m_new
        row_lse = m + torch.log(s)
        valid = tgt != ignore_index
        lse[r0:r1] = row_lse
        logp[idx] = torch.where(valid, z_tgt - row_lse, 0.0)
        if with_entropy:
            entropy[idx] = torch.where(valid, row_lse - t / s, 0.0)
    return logp, entropy, lse


def chunked_backward(
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
    tile_bytes: int = TILE_BYTES,
    row_chunk: int = ROW_CHUNK,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """dhidden ``[N, H]`` (hidden dtype), dweight ``[V, H]`` (weight dtype, fp32 accumulation) and dbias f32
    ``[V]`` (None without bias), recomputing logits tile by tile. Arguments as in ``chunked_forward`` plus
    f32 ``[N]`` upstream grads (``grad_entropy`` None: no entropy term) and the forward's lse ``[K]``;
    ``need_dhidden`` / ``need_dweight`` (which covers dbias) False: that gradient is skipped and None."""
    n, h_dim = hidden.shape
    v = weight.shape[0]
    k = n if rows is None else rows.shape[0]
    inv_temp = 1.0 / temperature
    dh = hidden.new_zeros(hidden.shape) if need_dhidden else None  # contiguous whatever hidden's strides
    dw = weight.new_zeros(v, h_dim, dtype=torch.float32) if need_dweight else None
    db = weight.new_zeros(v, dtype=torch.float32) if bias is not None and need_dweight else None
    if not (need_dhidden or need_dweight):
        return dh, dw, db
    row_chunk, col_chunk = _tile_shape(k, v, tile_bytes, row_chunk)
    for r0 in range(0, k, row_chunk):
        r1 = min(r0 + row_chunk, k)
        idx = _row_index(rows, r0, r1)
        h = hidden[idx].float()
        tgt = targets[idx]
        valid = tgt != ignore_index
        row_lse = lse[r0:r1]
        g = torch.where(valid, grad_logp[idx], 0.0)
        if grad_entropy is not None:
            e = torch.where(valid, grad_entropy[idx], 0.0)
            mean_z = row_lse - entropy[idx]
        dh_rows = torch.zeros_like(h) if dh is not None else None
        for v0 in range(0, v, col_chunk):
            v1 = min(v0 + col_chunk, v)
            z = _logits(h, weight, bias, v0, v1, inv_temp)
            dz = torch.exp(z - row_lse[:, None])  # p, turned into dz in place (a few tiles live at most)
            if grad_entropy is None:
                dz.mul_(-g[:, None])
            else:  # p * (e * (mean_z - z) - g), with p = 0 (a -inf logit) giving 0 rather than 0 * inf
                dz.mul_(z.sub_(mean_z[:, None]).mul_(-e[:, None]).sub_(g[:, None]).masked_fill_(dz == 0, 0.0))
            in_tile = valid & (tgt >= v0) & (tgt < v1)
            hit = in_tile.nonzero().squeeze(1)
            dz[hit, tgt[hit] - v0] += g[hit]
            dz.mul_(inv_temp)
            if dw is not None:
                dw[v0:v1].addmm_(dz.T, h)
            if db is not None:
                db[v0:v1] += dz.sum(dim=0)
            if dh is not None:
                dh_rows.addmm_(dz, weight[v0:v1].float())
        if dh is not None:
            dh[idx] = dh_rows.to(hidden.dtype)
    return dh, dw.to(weight.dtype) if dw is not None else None, db
