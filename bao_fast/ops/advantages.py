"""``shaped_advantages``: BAO's turn-level shaped advantages over a packed multi-turn batch (BAO.md, stage 2).

Semantics (the executable spec is ``bao_fast.ops.reference.shaped_advantages_reference``):

* Penalties use Σ r_t of the raw rewards and T' = turn_offsets[b+1] - turn_offsets[b], horizon T =
  ``cfg.horizon``. Information seeking applies when Σ r_t <= 0; over-thinking only when
  ``cfg.overthinking_coef > 0`` (0 turns it off), Σ r_t == 0 and T' < T.
* Credits and scores follow ``cfg.turn_credit`` / ``cfg.score``; the ``mean`` score of a trajectory
  without turns is 0.
* Groups are trajectories with equal ``group_ids`` (any int64 values, any order, any sizes).
  Â = (S - mean) / (std + eps) with Bessel's std; a group of one has mean 0, std 1 (Â = S / (1 + eps)); a group of
  two or more whose scores are all exactly equal has std 0 and Â = 0 exactly (decided on min == max, so
  rounding in the mean cannot turn 0/(0 + eps) into noise); ``norm_by_std=False`` gives Â = S - mean.
* A_j = c_t(j) · Â · N / C with N = number of trained tokens of the trajectory whose credit is non-zero and
  C = Σ of their credits; 0 when C == 0 and for untrained tokens (token_turn_ids == -1).

CUDA runs the Triton kernels of ``bao_fast.kernels.advantages`` (four launches, no host sync; values of
``turn_offsets`` / ``token_turn_ids`` are trusted there, since checking them would need a sync); the CPU
runs the vectorised torch implementation below and checks those values (outside torch.compile).
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch

from bao_fast.algo.shaping import ShapingConfig

__all__ = ["ShapedAdvantages", "shaped_advantages", "shaped_advantages_torch"]


class ShapedAdvantages(NamedTuple):
    """Outputs of ``shaped_advantages``, all in the dtype of ``turn_rewards``.

    token_advantages [T]: A_j per packed token (0 on untrained tokens). turn_credits [M]: c_t.
    scores [B]: trajectory scores S. normalized_scores [B]: group-normalised Â.
    """

    token_advantages: torch.Tensor
    turn_credits: torch.Tensor
    scores: torch.Tensor
    normalized_scores: torch.Tensor


def _validate(
    turn_rewards: torch.Tensor,
    turn_is_answer: torch.Tensor,
    turn_offsets: torch.Tensor,
    group_ids: torch.Tensor,
    token_turn_ids: torch.Tensor,
    cfg: ShapingConfig,
) -> None:
    if not isinstance(cfg, ShapingConfig):
        raise TypeError(f"cfg must be a ShapingConfig, got {type(cfg).__name__}")
    specs = {
        "turn_rewards": (turn_rewards, (torch.float32, torch.float64)),
        "turn_is_answer": (turn_is_answer, (torch.bool,)),
        "turn_offsets": (turn_offsets, (torch.int32,)),
        "group_ids": (group_ids, (torch.int64,)),
        "token_turn_ids": (token_turn_ids, (torch.int32,)),
    }
    for name, (tensor, dtypes) in specs.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in dtypes:
            raise TypeError(f"{name} must have dtype in {dtypes}, got {tensor.dtype}")
        if tensor.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
        if tensor.device != turn_rewards.device:
            raise ValueError(f"{name} is on {tensor.device}, expected {turn_rewards.device} (turn_rewards' device)")
    if turn_is_answer.numel() != turn_rewards.numel():
        raise ValueError(f"turn_is_answer has {turn_is_answer.numel()} turns, turn_rewards {turn_rewards.numel()}")
    if group_ids.numel() < 1:
        raise ValueError("group_ids must hold at least one trajectory")
    if turn_offsets.numel() != group_ids.numel() + 1:
        raise ValueError(
            f"turn_offsets must have B+1 = {group_ids.numel() + 1} entries (B = len(group_ids)), "
            f"got {turn_offsets.numel()}"
        )
    if turn_rewards.device.type == "cuda" or torch.compiler.is_compiling():
        return
    offsets = turn_offsets.tolist()
    if offsets[0] != 0 or offsets[-1] != turn_rewards.numel() or any(a > b for a, b in itertools.pairwise(offsets)):
        raise ValueError(f"turn_offsets must rise from 0 to M = {turn_rewards.numel()}, got {offsets}")
    if token_turn_ids.numel() and (int(token_turn_ids.min()) < -1 or int(token_turn_ids.max()) >= turn_rewards.numel()):
        raise ValueError(f"token_turn_ids must lie in [-1, M) with M = {turn_rewards.numel()}")


def shaped_advantages_torch(
    turn_rewards: torch.Tensor,
    turn_is_answer: torch.Tensor,
    turn_offsets: torch.Tensor,
    group_ids: torch.Tensor,
    token_turn_ids: torch.Tensor,
    cfg: ShapingConfig,
) -> ShapedAdvantages:
    """Vectorised torch implementation (any device; syncs with the host, so the CPU path). Same contract as
    ``shaped_advantages``; computes in the dtype of ``turn_rewards``."""
    dtype, device = turn_rewards.dtype, turn_rewards.device
    num_traj, num_turns = group_ids.numel(), turn_rewards.numel()
    offsets = turn_offsets.long()
    lengths = offsets[1:] - offsets[:-1]
    owner = torch.repeat_interleave(torch.arange(num_traj, device=device), lengths)
    local = torch.arange(num_turns, device=device) - offsets[:-1][owner]

    def per_traj_sum(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(num_traj, dtype=values.dtype, device=device).index_add_(0, owner, values)

    total = per_traj_sum(turn_rewards)
    prev_answer = torch.cat([turn_is_answer.new_zeros(1), turn_is_answer[:-1]]) & (local > 0)
    info = (total <= 0)[owner] & turn_is_answer & prev_answer
    penalty = -cfg.info_seeking_coef * info.to(dtype)
    if cfg.overthinking_coef > 0:
        overthought = (total == 0) & (lengths < cfg.horizon)
        big_p = cfg.overthinking_coef * (cfg.horizon - lengths).to(dtype) + 0.2
        late = torch.where(overthought, big_p / (lengths + 1).to(dtype), 0.0)[owner]
        first = torch.where(overthought & (lengths == 1), 0.5, 0.0).to(dtype)[owner]
        penalty = penalty - torch.where(local > 0, late, first)
    shaped = turn_rewards + penalty

    max_len = int(lengths.max())
    padded = torch.zeros(num_traj, max_len + 1, dtype=dtype, device=device)
    padded[owner, local] = shaped
    to_go = torch.zeros_like(padded)
    for t in range(max_len - 1, -1, -1):
        to_go[:, t] = padded[:, t] + cfg.gamma * to_go[:, t + 1]
    if cfg.turn_credit == "r2g":
        credits = to_go[owner, local]
    elif cfg.turn_credit == "equalized":
        credits = torch.ones_like(shaped)
    else:
        credits = 0.5 + 0.5 * (1.0 - torch.exp(-2.0 * shaped)) / (1.0 - math.exp(-2.0))

    if cfg.score == "sum":
        scores = per_traj_sum(shaped)
    elif cfg.score == "mean":
        scores = per_traj_sum(shaped) / lengths.clamp(min=1).to(dtype)
    else:
        scores = to_go[:, 0].clone()

    _, slot = torch.unique(group_ids, return_inverse=True)
    size = torch.bincount(slot, minlength=num_traj)[slot]
    mean = torch.zeros(num_traj, dtype=dtype, device=device).index_add_(0, slot, scores)[slot] / size.to(dtype)
    sq_dev = torch.zeros(num_traj, dtype=dtype, device=device).index_add_(0, slot, (scores - mean) ** 2)[slot]
    std = (sq_dev / (size - 1).clamp(min=1).to(dtype)).sqrt()
    lo = torch.full((num_traj,), float("inf"), dtype=dtype, device=device).scatter_reduce(0, slot, scores, "amin")
    hi = torch.full((num_traj,), float("-inf"), dtype=dtype, device=device).scatter_reduce(0, slot, scores, "amax")
    single = size == 1
    mean = torch.where(single, 0.0, mean)
    std = torch.where(single, 1.0, std)
    normalized = (scores - mean) / (std + cfg.eps) if cfg.norm_by_std else scores - mean
    normalized = torch.where((lo[slot] == hi[slot]) & ~single, 0.0, normalized)

    slot_of_token = token_turn_ids + 1  # slot 0 collects the untrained tokens
    tokens_per_turn = torch.bincount(slot_of_token, minlength=num_turns + 1)[1:]
    nonzero = per_traj_sum(tokens_per_turn * (credits != 0))
    credit_sum = per_traj_sum(credits * tokens_per_turn.to(dtype))
    scale = torch.where(credit_sum != 0, normalized * nonzero.to(dtype) / credit_sum, 0.0)
    turn_adv = torch.cat([credits.new_zeros(1), credits * scale[owner]])
    token_adv = turn_adv.index_select(0, slot_of_token)
    return ShapedAdvantages(token_adv, credits, scores, normalized)


@torch.library.custom_op("bao_fast::shaped_advantages", mutates_args=())
def _shaped_advantages_op(
    turn_rewards: torch.Tensor,
    turn_is_answer: torch.Tensor,
    turn_offsets: torch.Tensor,
    group_ids: torch.Tensor,
    token_turn_ids: torch.Tensor,
    turn_credit: str,
    score: str,
    gamma: float,
    info_seeking_coef: float,
    overthinking_coef: float,
    horizon: int,
    norm_by_std: bool,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = ShapingConfig(turn_credit, score, gamma, info_seeking_coef, overthinking_coef, horizon, norm_by_std, eps)
    args = (turn_rewards, turn_is_answer, turn_offsets, group_ids, token_turn_ids)
    if turn_rewards.device.type == "cuda":
        from bao_fast.kernels.advantages import shaped_advantages_triton

        with torch.cuda.device(turn_rewards.device):  # Triton launches on the current device, not the tensors'
            return shaped_advantages_triton(*(a.contiguous() for a in args), cfg)
    return tuple(shaped_advantages_torch(*args, cfg))


@_shaped_advantages_op.register_fake
def _(turn_rewards, turn_is_answer, turn_offsets, group_ids, token_turn_ids, *_cfg):
    num_traj = group_ids.shape[0]
    return (
        turn_rewards.new_empty(token_turn_ids.shape),
        torch.empty_like(turn_rewards),
        turn_rewards.new_empty(num_traj),
        turn_rewards.new_empty(num_traj),
    )


def shaped_advantages(
    turn_rewards: torch.Tensor,
    turn_is_answer: torch.Tensor,
    turn_offsets: torch.Tensor,
    group_ids: torch.Tensor,
    token_turn_ids: torch.Tensor,
    cfg: ShapingConfig,
) -> ShapedAdvantages:
    """BAO shaped advantages of a packed batch (semantics in the module docstring).

    Args: turn_rewards float32/float64[M] raw per-turn rewards; turn_is_answer bool[M]; turn_offsets
    int32[B+1] (trajectory b owns turns offsets[b]:offsets[b+1]); group_ids int64[B]; token_turn_ids
    int32[T] global turn of each token, -1 for untrained tokens (a PackedBatch's ``target_turn_ids`` gives
    advantages aligned with ``token_logprobs`` rows); cfg the ``ShapingConfig``.
    Returns ``ShapedAdvantages`` in the dtype of ``turn_rewards``. Not differentiable.
    """
    _validate(turn_rewards, turn_is_answer, turn_offsets, group_ids, token_turn_ids, cfg)
    out = _shaped_advantages_op(
        turn_rewards,
        turn_is_answer,
        turn_offsets,
        group_ids,
        token_turn_ids,
        cfg.turn_credit,
        cfg.score,
        cfg.gamma,
        cfg.info_seeking_coef,
        cfg.overthinking_coef,
        cfg.horizon,
        cfg.norm_by_std,
        cfg.eps,
    )
    return ShapedAdvantages(*out)
