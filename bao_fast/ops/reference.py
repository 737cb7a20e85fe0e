"""Pure-PyTorch reference of every public op: the executable spec that kernels, tests and benchmarks
compare against. Written for clarity, not speed (loops where the math is a loop); compute in fp64 where
the caller passes fp64. Each section belongs to one op."""

from __future__ import annotations

import math

import torch

from bao_fast.algo.shaping import ShapingConfig


# ---- pack_multiturn (issue 3) -----------------------------------------------------------------------
def pack_multiturn_reference(
    seg_lens: torch.Tensor,
    seg_trained: torch.Tensor,
    seq_seg_offsets: torch.Tensor,
    input_ids: torch.Tensor,
    ignore_index: int = -100,
) -> dict[str, torch.Tensor]:
    """Spec of ``bao_fast.ops.pack_multiturn``: one trajectory, then one segment at a time.

    Args: seg_lens int32[S], seg_trained bool[S], seq_seg_offsets int32[B+1] (CPU, valid), input_ids
    int64[T]. Returns the op's outputs by ``PackedBatch`` field name (cu_seqlens, position_ids, loss_mask,
    turn_ids, turn_offsets, seq_ids, targets, target_mask, target_turn_ids, target_rows) on
    ``input_ids.device``. Every trained segment is a turn, zero-length ones included; row t predicts token
    t+1 of the same trajectory (``ignore_index`` / false / -1 at the trajectory's last token).
    """
    lens, trained, offs = seg_lens.tolist(), seg_trained.tolist(), seq_seg_offsets.tolist()
    ids_cpu = input_ids.cpu()
    cu_seqlens, turn_offsets = [0], [0]
    positions, loss_mask, turn_ids, seq_ids = [], [], [], []
    targets, target_mask, target_turn_ids = [], [], []
    turn = 0
    for b in range(len(offs) - 1):
        mask_b, turns_b = [torch.zeros(0, dtype=torch.bool)], [torch.zeros(0, dtype=torch.int32)]
        for s in range(offs[b], offs[b + 1]):
            mask_b.append(torch.full((lens[s],), trained[s], dtype=torch.bool))
            turns_b.append(torch.full((lens[s],), turn if trained[s] else -1, dtype=torch.int32))
            turn += int(trained[s])
        mask, turns = torch.cat(mask_b), torch.cat(turns_b)
        start, n = cu_seqlens[-1], mask.numel()
        ids = ids_cpu[start : start + n]
        positions.append(torch.arange(n, dtype=torch.int64))
        loss_mask.append(mask)
        turn_ids.append(turns)
        seq_ids.append(torch.full((n,), b, dtype=torch.int32))
        # Row t predicts token t + 1; nothing follows the trajectory's last token.
        last = slice(0, 1) if n else slice(0, 0)
        targets.append(torch.cat([ids[1:], torch.tensor([ignore_index])[last]]))
        target_mask.append(torch.cat([mask[1:], torch.tensor([False])[last]]))
        target_turn_ids.append(torch.cat([turns[1:], torch.tensor([-1], dtype=torch.int32)[last]]))
        cu_seqlens.append(start + n)
        turn_offsets.append(turn)

    def flat(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return torch.cat([torch.zeros(0, dtype=dtype), *parts]).to(input_ids.device)

    row_mask = flat(target_mask, torch.bool)
    return dict(
        cu_seqlens=torch.tensor(cu_seqlens, dtype=torch.int32, device=input_ids.device),
        position_ids=flat(positions, torch.int64),
        loss_mask=flat(loss_mask, torch.bool),
        turn_ids=flat(turn_ids, torch.int32),
        turn_offsets=torch.tensor(turn_offsets, dtype=torch.int32, device=input_ids.device),
        seq_ids=flat(seq_ids, torch.int32),
        targets=flat(targets, torch.int64),
        target_mask=row_mask,
        target_turn_ids=flat(target_turn_ids, torch.int32),
        target_rows=row_mask.nonzero().flatten(),
    )


# ---- token_logprobs (issue 4) -----------------------------------------------------------------------
def token_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    target_rows: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Spec of ``token_logprobs``: full fp64 logits ``z = (hidden @ weight.T + bias) / temperature``.

    Returns logp ``[N]`` (``z[target] - logsumexp(z)``) and, with ``return_entropy``, the positive entropy
    ``logsumexp(z) - sum(softmax(z) * z)`` ``[N]``, both fp64; differentiable. Rows whose target is
    ``ignore_index``, and rows not in ``target_rows`` when given, are 0 and get no gradient. A ``-inf``
    logit (a masked vocabulary entry) has p = 0 and adds 0 to the entropy (0 log 0 = 0).
    """
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    logits = logits / temperature
    keep = targets != ignore_index
    if target_rows is not None:
        listed = torch.zeros_like(keep)
        listed[target_rows] = True
        keep = keep & listed
    logprobs = torch.log_softmax(logits, dim=-1)
    safe_targets = torch.where(keep, targets, 0)
    logp = torch.where(keep, logprobs.gather(-1, safe_targets[:, None]).squeeze(-1), 0.0)
    if not return_entropy:
        return logp
    probs = logprobs.exp()
    entropy = torch.where(keep, -(probs * logprobs.masked_fill(probs == 0, 0.0)).sum(-1), 0.0)  # 0 log 0 = 0
    return logp, entropy

# ---- shaped_advantages (issue 5) --------------------------------------------------------------------
from bao_fast.ops.advantages import ShapedAdvantages  # noqa: E402


def _turn_penalties(rewards: list[float], is_answer: list[bool], cfg: ShapingConfig) -> list[float]:
    """BAO penalties p_t of one trajectory (BAO.md, stage 2); ``t`` below is 0-based (BAO's t >= 2 is t >= 1).

    Information seeking (failed = Σ r_t <= 0): p_t -= λ_IS when turns t-1 and t are both answers.
    Over-thinking (only when λ_OT > 0, Σ r_t == 0 and T' < T): p_t -= P / (T' + 1) for t >= 1 with
    P = λ_OT (T - T') + 0.2; a single-turn trajectory instead gets p_0 -= 0.5.
    """
    n = len(rewards)
    total = sum(rewards)
    penalties = [0.0] * n
    if total <= 0:
        for t in range(1, n):
            if is_answer[t] and is_answer[t - 1]:
                penalties[t] -= cfg.info_seeking_coef
    if cfg.overthinking_coef > 0 and total == 0 and n < cfg.horizon:
        big_p = cfg.overthinking_coef * (cfg.horizon - n) + 0.2
        for t in range(1, n):
            penalties[t] -= big_p / (n + 1)
        if n == 1:
            penalties[0] -= 0.5
    return penalties


def _turn_credits(shaped: list[float], cfg: ShapingConfig) -> list[float]:
    """Turn credits c_t from the penalised rewards r̃_t (``cfg.turn_credit``)."""
    if cfg.turn_credit == "equalized":
        return [1.0] * len(shaped)
    if cfg.turn_credit == "em":
        return [0.5 + 0.5 * (1.0 - math.exp(-2.0 * r)) / (1.0 - math.exp(-2.0)) for r in shaped]
    credits, running = [0.0] * len(shaped), 0.0
    for t in reversed(range(len(shaped))):
        running = shaped[t] + cfg.gamma * running
        credits[t] = running
    return credits


def _trajectory_score(shaped: list[float], cfg: ShapingConfig) -> float:
    """Trajectory score S from r̃_t (``cfg.score``); the mean of a trajectory without turns is 0."""
    if cfg.score == "sum":
        return sum(shaped)
    if cfg.score == "mean":
        return sum(shaped) / len(shaped) if shaped else 0.0
    return sum(cfg.gamma**t * r for t, r in enumerate(shaped))


def shaped_advantages_reference(
    turn_rewards: torch.Tensor,
    turn_is_answer: torch.Tensor,
    turn_offsets: torch.Tensor,
    group_ids: torch.Tensor,
    token_turn_ids: torch.Tensor,
    cfg: ShapingConfig,
) -> ShapedAdvantages:
    """fp64 per-trajectory loop of BAO.md's shaping: penalties, credits, scores, group normalisation, tokens.

    Group statistics over trajectories with equal ``group_ids``: Â = (S - mean) / (std + eps), std with
    Bessel's correction; a group of one has mean 0 and std 1 (Â = S / (1 + eps)); a group whose scores are all equal
    has Â = 0 exactly; ``norm_by_std=False`` gives Â = S - mean. Tokens: A_j = c_t(j) · Â · N / C per
    trajectory (N = trained tokens with c != 0, C = Σ c over trained tokens), 0 when C == 0 or untrained.
    Returns fp64 tensors on the CPU.
    """
    rewards = turn_rewards.double().cpu().tolist()
    answers = turn_is_answer.bool().cpu().tolist()
    offsets = turn_offsets.cpu().tolist()
    groups = group_ids.cpu().tolist()
    token_turns = token_turn_ids.cpu().tolist()
    num_traj, num_turns = len(offsets) - 1, len(rewards)

    credits = [0.0] * num_turns
    scores = [0.0] * num_traj
    turn_owner = [0] * num_turns
    for b in range(num_traj):
        lo, hi = offsets[b], offsets[b + 1]
        penalties = _turn_penalties(rewards[lo:hi], answers[lo:hi], cfg)
        shaped = [r + p for r, p in zip(rewards[lo:hi], penalties)]
        credits[lo:hi] = _turn_credits(shaped, cfg)
        scores[b] = _trajectory_score(shaped, cfg)
        turn_owner[lo:hi] = [b] * (hi - lo)

    normalized = [0.0] * num_traj
    for b in range(num_traj):
        members = [scores[k] for k in range(num_traj) if groups[k] == groups[b]]
        if len(members) == 1:
            mean, std = 0.0, 1.0
        else:
            mean = sum(members) / len(members)
            std = math.sqrt(sum((s - mean) ** 2 for s in members) / (len(members) - 1))
        if len(members) > 1 and min(members) == max(members):
            normalized[b] = 0.0
        elif cfg.norm_by_std:
            normalized[b] = (scores[b] - mean) / (std + cfg.eps)
        else:
            normalized[b] = scores[b] - mean

    nonzero = [0] * num_traj
    credit_sum = [0.0] * num_traj
    for turn in token_turns:
        if turn >= 0:
            b = turn_owner[turn]
            nonzero[b] += credits[turn] != 0.0
            credit_sum[b] += credits[turn]
    token_adv = [0.0] * len(token_turns)
    for j, turn in enumerate(token_turns):
        if turn >= 0:
            b = turn_owner[turn]
            if credit_sum[b] != 0.0:
                token_adv[j] = credits[turn] * normalized[b] * nonzero[b] / credit_sum[b]

    f64 = torch.float64
    return ShapedAdvantages(
        token_advantages=torch.tensor(token_adv, dtype=f64),
        turn_credits=torch.tensor(credits, dtype=f64),
        scores=torch.tensor(scores, dtype=f64),
        normalized_scores=torch.tensor(normalized, dtype=f64),
    )

# ---- clipped_ratio_loss (issue 5) -------------------------------------------------------------------
def _kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Per-token KL estimate to the reference policy: k1 = logp - ref, k2 = (logp - ref)^2 / 2,
    k3 = e^x - x - 1 with x = ref - logp clamped to [-10, 10]."""
    if kl_type == "k1":
        return logp - ref_logp
    if kl_type == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    x = torch.clamp(ref_logp - logp, -10.0, 10.0)
    return torch.exp(x) - x - 1.0


def clipped_ratio_loss_reference(
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
    """Clipped-ratio policy loss (verl semantics, but k3 clamps its log-ratio where verl's ``low_var_kl`` clamps
    the result: :func:`_kl_penalty`), differentiable through ``logp`` by torch autograd.

    Per token: ρ = exp(clamp(logp - old_logp, -20, 20)); pg = max(-A ρ, -A clip(ρ, 1 - clip_low,
    1 + clip_high)); for A < 0, pg = min(pg, -A · dual_clip); l = pg + kl_coef · kl(logp, ref_logp).
    Aggregation over masked tokens, sequences from ``cu_seqlens``:
    token-mean Σ l / Σ mask; seq-mean-token-mean = mean over sequences with >= 1 masked token of their token
    means; seq-mean-token-sum = Σ_s (Σ_{j∈s} l) / num_seqs; seq-mean-token-sum-norm = Σ_s (Σ_{j∈s} l) /
    norm_length (verl's ``agg_loss``). An empty selection gives 0. Stats (masked token means, detached):
    clipfrac (pg2 > pg1), clipfrac_lower (dual clip active), approx_kl = mean(old_logp - logp), kl.
    Computes in the inputs' dtype (pass fp64 for the spec).
    """
    m = mask.bool()
    ratio = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg1, pg2)
    pg3 = -advantages * dual_clip
    per_token = torch.where(advantages < 0, torch.minimum(pg, pg3), pg)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        kl = _kl_penalty(logp, ref_logp, kl_type)
        per_token = per_token + kl_coef * kl
    per_token = torch.where(m, per_token, torch.zeros_like(per_token))

    if agg == "token-mean":
        loss = per_token.sum() / max(int(m.sum()), 1)
    else:
        bounds = cu_seqlens.tolist()
        seq_sums, seq_means = [], []
        for s in range(len(bounds) - 1):
            lo, hi = bounds[s], bounds[s + 1]
            seq_sums.append(per_token[lo:hi].sum())
            count = int(m[lo:hi].sum())
            if count > 0:
                seq_means.append(per_token[lo:hi].sum() / count)
        if agg == "seq-mean-token-mean":
            loss = torch.stack(seq_means).mean() if seq_means else per_token.sum() * 0.0
        elif agg == "seq-mean-token-sum":
            loss = torch.stack(seq_sums).sum() / len(seq_sums)
        else:
            loss = torch.stack(seq_sums).sum() / norm_length

    count = max(int(m.sum()), 1)
    with torch.no_grad():
        stats = {
            "clipfrac": ((pg2 > pg1) & m).sum().to(logp.dtype) / count,
            "clipfrac_lower": ((advantages < 0) & (pg3 < pg) & m).sum().to(logp.dtype) / count,
            "approx_kl": torch.where(m, old_logp - logp, 0.0).sum() / count,
            "kl": torch.where(m, kl, 0.0).sum() / count,
        }
    return loss, stats
