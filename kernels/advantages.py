"""Triton kernels of ``shaped_advantages`` (BAO.md, stage 2): penalties, turn credits, trajectory scores,
group normalisation and per-token advantages over a packed multi-turn batch.

Four launches, no host synchronisation, deterministic (floating-point sums have a fixed order; the only
atomics add integers):

1. ``_turn_token_count_kernel`` (token blocks): n_t = number of trained tokens of every turn.
2. ``_trajectory_shaping_kernel`` (trajectory blocks): penalties, r̃_t, credits c_t, scores S.
3. ``_group_normalize_kernel`` (trajectory blocks): group mean / Bessel std by comparing group ids against
   every trajectory (tiles whose id ranges cannot overlap are skipped, so grouped batches cost ~O(B)),
   Â, N = Σ_{c_t != 0} n_t, C = Σ c_t n_t and the per-turn advantage a_t = c_t Â N / C.
4. ``_token_gather_kernel`` (token blocks): A_j = a_{t(j)}, 0 for untrained tokens.

Token traffic: 4 B/token read twice and 4 B/token written.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from bao_fast.algo.shaping import ShapingConfig

_CREDIT_CODES = {"r2g": 0, "equalized": 1, "em": 2}
_SCORE_CODES = {"sum": 0, "mean": 1, "r2g": 2}
_EM_DENOM: tl.constexpr = tl.constexpr(1.0 - math.exp(-2.0))  # made a constant of the data's dtype in kernels
TOKEN_BLOCK = 1024
TRAJ_BLOCK = 64
GROUP_TILE = 16  # 64 x 16 comparison tiles: spill-free in fp32 and fp64 on sm_80 and sm_90 with Triton 3.6 to 3.9


@triton.jit
def _turn_token_count_kernel(token_turn_ids_ptr, counts_ptr, num_tokens, BLOCK: tl.constexpr):
    """counts[t] += number of tokens with token_turn_ids == t (int32). A block histograms the turn ids within
    BLOCK of its smallest id and adds one atomic per non-empty bin; ids further away add one atomic each."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tid = tl.load(token_turn_ids_ptr + offs, mask=offs < num_tokens, other=-1)
    valid = tid >= 0
    lo = tl.min(tl.where(valid, tid, 2147483647), axis=0)
    rel = tid - lo
    near = valid & (rel < BLOCK)
    hist = tl.histogram(rel, BLOCK, mask=near)
    bins = tl.arange(0, BLOCK)
    tl.atomic_add(counts_ptr + lo + bins, hist, mask=hist > 0, sem="relaxed")
    far = valid & (rel >= BLOCK)
    tl.atomic_add(counts_ptr + tid, tl.full([BLOCK], 1, tl.int32), mask=far, sem="relaxed")


@triton.jit
def _trajectory_shaping_kernel(
    rewards_ptr,
    answer_ptr,
    offsets_ptr,
    credits_ptr,
    scores_ptr,
    num_traj,
    gamma: tl.float64,
    info_seeking_coef: tl.float64,
    overthinking_coef: tl.float64,
    horizon,
    CREDIT: tl.constexpr,
    SCORE: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """One lane per trajectory: Σ r_t (forward loop), then a reverse loop over turns computing p_t, r̃_t,
    the discounted reward-to-go, the credits and the score. The coefficients arrive as fp64 and become
    constants of the rewards' dtype, so fp64 rewards get fp64 coefficients (a float argument would be fp32)."""
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    in_b = b < num_traj
    start = tl.load(offsets_ptr + b, mask=in_b, other=0)
    n = tl.load(offsets_ptr + b + 1, mask=in_b, other=0) - start
    max_n = tl.max(n, axis=0)
    acc_dtype = rewards_ptr.dtype.element_ty
    gamma_c = tl.full([], gamma, acc_dtype)
    info_c = tl.full([], info_seeking_coef, acc_dtype)
    overthinking_c = tl.full([], overthinking_coef, acc_dtype)
    em_denom = tl.full([], _EM_DENOM, acc_dtype)

    total = tl.zeros([BLOCK_B], dtype=acc_dtype)
    for i in range(0, max_n):
        total += tl.load(rewards_ptr + start + i, mask=i < n, other=0.0)
    failed = total <= 0.0
    overthought = (overthinking_coef > 0.0) & (total == 0.0) & (n < horizon)
    big_p = overthinking_c * (horizon - n).to(acc_dtype) + tl.full([], 0.2, acc_dtype)
    late_penalty = tl.where(overthought, big_p / (n + 1).to(acc_dtype), 0.0)
    first_penalty = tl.where(overthought & (n == 1), 0.5, 0.0)

    running = tl.zeros([BLOCK_B], dtype=acc_dtype)
    shaped_sum = tl.zeros([BLOCK_B], dtype=acc_dtype)
    for k in range(0, max_n):
        t = tl.zeros_like(n) + (max_n - 1 - k)
        live = t < n
        r = tl.load(rewards_ptr + start + t, mask=live, other=0.0)
        answer = tl.load(answer_ptr + start + t, mask=live, other=0) != 0
        prev_answer = tl.load(answer_ptr + start + t - 1, mask=live & (t > 0), other=0) != 0
        info_penalty = tl.where(failed & answer & prev_answer, info_c, 0.0)
        shaped = r - info_penalty - tl.where(t > 0, late_penalty, first_penalty)
        shaped = tl.where(live, shaped, 0.0)
        running = shaped + gamma_c * running
        shaped_sum += shaped
        if CREDIT == 0:
            credit = running
        elif CREDIT == 1:
            credit = tl.full([BLOCK_B], 1.0, acc_dtype)
        else:
            credit = 0.5 + 0.5 * (1.0 - tl.exp(-2.0 * shaped)) / em_denom
        tl.store(credits_ptr + start + t, credit.to(acc_dtype), mask=live)

    if SCORE == 0:
        score = shaped_sum
    elif SCORE == 1:
        score = shaped_sum / tl.maximum(n, 1).to(acc_dtype)
    else:
        score = running
    tl.store(scores_ptr + b, score, mask=in_b)


@triton.jit
def _group_normalize_kernel(
    scores_ptr,
    group_ptr,
    offsets_ptr,
    credits_ptr,
    counts_ptr,
    normalized_ptr,
    turn_adv_ptr,
    num_traj,
    eps: tl.float64,
    NORM_BY_STD: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """Â_b from the scores of trajectories with the same group id (mean, Bessel std, min, max in two
    passes over all trajectories), then a_t = c_t Â N / C for the turns of trajectory b."""
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    in_b = b < num_traj
    b_safe = tl.minimum(b, num_traj - 1)
    g = tl.load(group_ptr + b_safe)
    s = tl.load(scores_ptr + b_safe)
    g_lo = tl.min(g, axis=0)
    g_hi = tl.max(g, axis=0)
    acc_dtype = s.dtype

    count = tl.zeros([BLOCK_B], dtype=tl.int32)
    total = tl.zeros([BLOCK_B], dtype=acc_dtype)
    s_min = tl.full([BLOCK_B], float("inf"), acc_dtype)
    s_max = tl.full([BLOCK_B], float("-inf"), acc_dtype)
    for j0 in range(0, num_traj, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        gj = tl.load(group_ptr + tl.minimum(j, num_traj - 1))
        if (tl.min(gj, axis=0) <= g_hi) & (tl.max(gj, axis=0) >= g_lo):
            sj = tl.load(scores_ptr + j, mask=j < num_traj, other=0.0)
            same = (g[:, None] == gj[None, :]) & (j < num_traj)[None, :]
            count += tl.sum(same.to(tl.int32), axis=1)
            total += tl.sum(tl.where(same, sj[None, :], 0.0), axis=1)
            s_min = tl.minimum(s_min, tl.min(tl.where(same, sj[None, :], float("inf")), axis=1))
            s_max = tl.maximum(s_max, tl.max(tl.where(same, sj[None, :], float("-inf")), axis=1))
    mean = total / count.to(acc_dtype)

    sq_dev = tl.zeros([BLOCK_B], dtype=acc_dtype)
    for j0 in range(0, num_traj, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        gj = tl.load(group_ptr + tl.minimum(j, num_traj - 1))
        if (tl.min(gj, axis=0) <= g_hi) & (tl.max(gj, axis=0) >= g_lo):
            sj = tl.load(scores_ptr + j, mask=j < num_traj, other=0.0)
            same = (g[:, None] == gj[None, :]) & (j < num_traj)[None, :]
            dev = sj[None, :] - mean[:, None]
            sq_dev += tl.sum(tl.where(same, dev * dev, 0.0), axis=1)

    single = count == 1
    std = tl.sqrt(sq_dev / tl.maximum(count - 1, 1).to(acc_dtype))
    mean = tl.where(single, 0.0, mean)
    std = tl.where(single, 1.0, std)
    adv = (s - mean) / (std + tl.full([], eps, acc_dtype)) if NORM_BY_STD else s - mean
    adv = tl.where((s_min == s_max) & ~single, 0.0, adv)
    tl.store(normalized_ptr + b, adv, mask=in_b)

    start = tl.load(offsets_ptr + b, mask=in_b, other=0)
    n = tl.load(offsets_ptr + b + 1, mask=in_b, other=0) - start
    max_n = tl.max(n, axis=0)
    nonzero = tl.zeros([BLOCK_B], dtype=tl.int32)
    credit_sum = tl.zeros([BLOCK_B], dtype=acc_dtype)
    for t in range(0, max_n):
        live = t < n
        c = tl.load(credits_ptr + start + t, mask=live, other=0.0)
        tokens = tl.load(counts_ptr + start + t, mask=live, other=0)
        nonzero += tl.where(c != 0.0, tokens, 0)
        credit_sum += c * tokens.to(acc_dtype)
    has_credit = credit_sum != 0.0
    scale = tl.where(has_credit, adv * nonzero.to(acc_dtype) / tl.where(has_credit, credit_sum, 1.0), 0.0)
    for t in range(0, max_n):
        live = t < n
        c = tl.load(credits_ptr + start + t, mask=live, other=0.0)
        tl.store(turn_adv_ptr + start + t, c * scale, mask=live)


@triton.jit
def _token_gather_kernel(token_turn_ids_ptr, turn_adv_ptr, out_ptr, num_tokens, BLOCK: tl.constexpr):
    """out[j] = turn_adv[token_turn_ids[j]], 0 where token_turn_ids[j] == -1."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_t = offs < num_tokens
    tid = tl.load(token_turn_ids_ptr + offs, mask=in_t, other=-1)
    adv = tl.load(turn_adv_ptr + tid, mask=in_t & (tid >= 0), other=0.0)
    tl.store(out_ptr + offs, adv, mask=in_t)


def shaped_advantages_triton(
    turn_rewards: torch.Tensor,
    turn_is_answer: torch.Tensor,
    turn_offsets: torch.Tensor,
    group_ids: torch.Tensor,
    token_turn_ids: torch.Tensor,
    cfg: ShapingConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the four kernels. Inputs must be validated and contiguous: turn_rewards float[M],
    turn_is_answer bool[M], turn_offsets int32[B+1], group_ids int64[B] (B >= 1), token_turn_ids int32[T].

    Returns (token_advantages float[T], turn_credits float[M], scores float[B], normalized_scores float[B])
    in the dtype of ``turn_rewards``.
    """
    num_turns, num_traj, num_tokens = turn_rewards.numel(), group_ids.numel(), token_turn_ids.numel()
    counts = torch.zeros(num_turns, dtype=torch.int32, device=turn_rewards.device)
    credits = torch.empty_like(turn_rewards)
    scores = torch.empty(num_traj, dtype=turn_rewards.dtype, device=turn_rewards.device)
    normalized = torch.empty_like(scores)
    turn_adv = torch.empty_like(turn_rewards)
    token_adv = torch.empty(num_tokens, dtype=turn_rewards.dtype, device=turn_rewards.device)

    token_grid = (triton.cdiv(num_tokens, TOKEN_BLOCK),)
    traj_grid = (triton.cdiv(num_traj, TRAJ_BLOCK),)
    if num_tokens > 0:
        _turn_token_count_kernel[token_grid](token_turn_ids, counts, num_tokens, BLOCK=TOKEN_BLOCK)
    _trajectory_shaping_kernel[traj_grid](
        turn_rewards,
        turn_is_answer.view(torch.uint8),
        turn_offsets,
        credits,
        scores,
        num_traj,
        cfg.gamma,
        cfg.info_seeking_coef,
        cfg.overthinking_coef,
        cfg.horizon,
        CREDIT=_CREDIT_CODES[cfg.turn_credit],
        SCORE=_SCORE_CODES[cfg.score],
        BLOCK_B=TRAJ_BLOCK,
    )
    _group_normalize_kernel[traj_grid](
        scores,
        group_ids,
        turn_offsets,
        credits,
        counts,
        normalized,
        turn_adv,
        num_traj,
        cfg.eps,
        NORM_BY_STD=cfg.norm_by_std,
        BLOCK_B=TRAJ_BLOCK,
        BLOCK_J=GROUP_TILE,
    )
    if num_tokens > 0:
        _token_gather_kernel[token_grid](token_turn_ids, turn_adv, token_adv, num_tokens, BLOCK=TOKEN_BLOCK)
    return token_adv, credits, scores, normalized
