"""Triton shaped-advantage kernels (TRITON_INTERPRET=1 on CPU) against the fp64 per-trajectory reference."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from bao_fast.kernels.advantages import TOKEN_BLOCK, shaped_advantages_triton

from bao_fast.algo.shaping import ShapingConfig, preset
from bao_fast.ops.reference import shaped_advantages_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU tensors: the Triton interpreter

HORIZON = 6
# Dyadic rewards keep Σ r_t exact in fp32 and fp64, so the "failed" / "Σ r = 0" branches agree.
REWARDS = (0.0, 0.0, 0.0, 1.0, -0.5, 0.25)
CONFIGS = {
    "bao": preset("bao", horizon=HORIZON),
    "userrl": preset("userrl", horizon=HORIZON),
    "grpo": preset("grpo", horizon=HORIZON),
    "em-mean-drgrpo": ShapingConfig(
        "em", "mean", info_seeking_coef=0.05, overthinking_coef=0.1, horizon=HORIZON, norm_by_std=False
    ),
    "r2g-plain": ShapingConfig("r2g", "sum", horizon=HORIZON),  # failed trajectories: C = 0, A = 0
    "r2g-r2g": ShapingConfig("r2g", "r2g", gamma=0.9, info_seeking_coef=0.01, overthinking_coef=0.05, horizon=HORIZON),
}


pytestmark = pytest.mark.usefixtures("poisoned_outputs")  # launcher buffers start as NaN / 2**30


def run_kernels(batch, cfg) -> tuple[torch.Tensor, ...]:
    """The launcher on ``DEVICE``; its four outputs come back to the CPU beside the reference's."""
    return tuple(t.cpu() for t in shaped_advantages_triton(*(t.to(DEVICE) for t in batch), cfg))


def make_batch(num_traj: int, seed: int, *, max_turn_tokens: int = 5, shuffle_tokens: bool = False):
    """A packed batch with the edge cases the shaping must handle: groups of one, all-failed groups, groups of
    identical trajectories (std 0), T' in {0, 1, horizon} and between, turns without tokens, arbitrary
    non-contiguous int64 group ids, untrained tokens between turns."""
    rng = random.Random(seed)
    ids = rng.sample(range(-(10**12), 10**12), num_traj)
    lengths, rewards, answers, groups = [], [], [], []
    b = 0
    while b < num_traj:
        size = min(rng.choice([1, 1, 2, 3, 4, 8]), num_traj - b)
        kind = rng.choice(["random", "failed", "identical"])
        gid = ids[b]
        template = None
        for _ in range(size):
            if kind == "identical" and template is not None:
                n, r, a = template
            else:
                n = rng.choice([0, 1, 1, 2, 3, HORIZON - 1, HORIZON])
                pool = (0.0, 0.0, -0.5) if kind == "failed" else REWARDS
                r = [rng.choice(pool) for _ in range(n)]
                a = [rng.random() < 0.6 for _ in range(n)]
                template = (n, r, a)
            lengths.append(n)
            rewards += r
            answers += a
            groups.append(gid)
        b += size
    perm = list(range(num_traj))
    rng.shuffle(perm)  # group members are not adjacent
    offsets, turn_order = [0], []
    starts = [sum(lengths[:k]) for k in range(num_traj)]
    for k in perm:
        turn_order += range(starts[k], starts[k] + lengths[k])
        offsets.append(offsets[-1] + lengths[k])
    token_turns: list[int] = []
    for m in range(len(turn_order)):
        token_turns += [-1] * rng.randint(0, 3) + [m] * rng.randint(0, max_turn_tokens)
    token_turns.append(-1)
    if shuffle_tokens:
        rng.shuffle(token_turns)
    return (
        torch.tensor([rewards[m] for m in turn_order], dtype=torch.float32),
        torch.tensor([answers[m] for m in turn_order], dtype=torch.bool),
        torch.tensor(offsets, dtype=torch.int32),
        torch.tensor([groups[k] for k in perm], dtype=torch.int64),
        torch.tensor(token_turns, dtype=torch.int32),
    )


def assert_matches_reference(out, ref, turn_offsets, token_turn_ids, tol=2e-5):
    """Outputs within ``tol`` relative error; token advantages scaled by the conditioning Σ|c| / |Σ c| of
    each trajectory's credit sum C (credits of both signs can cancel)."""
    token_adv, credits, scores, normalized = (t.double() for t in out)
    for name, got, want in zip(("turn_credits", "scores", "normalized_scores"), (credits, scores, normalized), ref[1:]):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")
    owner = torch.searchsorted(turn_offsets.long(), torch.arange(credits.numel()), right=True) - 1
    trained = token_turn_ids >= 0
    turn_of = token_turn_ids.clamp(min=0).long()
    traj, credit = owner[turn_of][trained], ref[1][turn_of][trained]
    abs_sum = torch.zeros(scores.numel(), dtype=torch.float64).index_add_(0, traj, credit.abs())
    signed = torch.zeros(scores.numel(), dtype=torch.float64).index_add_(0, traj, credit)
    cond = torch.where(signed != 0, abs_sum / signed.abs(), 1.0)[owner[turn_of]]
    err = (token_adv - ref[0]).abs()
    bound = tol * (1.0 + ref[0].abs() * cond)
    assert bool((err <= bound).all()), f"token_advantages: max excess {(err - bound).max().item():.3g}"
    assert bool((token_adv[~trained] == 0).all()), "untrained tokens must get advantage 0"


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("seed", [0, 1])
def test_kernels_match_reference(name, seed):
    cfg = CONFIGS[name]
    batch = make_batch(97, seed)
    out = run_kernels(batch, cfg)
    ref = shaped_advantages_reference(*batch, cfg)
    assert [t.dtype for t in out] == [torch.float32] * 4
    assert [t.shape for t in out] == [t.shape for t in ref]
    assert_matches_reference(out, ref, batch[2], batch[4])


def test_unsorted_tokens_and_many_turns():
    """More turns than a token block and shuffled token order: the per-turn token counts take the histogram
    path and the one-atomic-per-token path."""
    cfg = CONFIGS["bao"]
    batch = make_batch(420, 7, max_turn_tokens=2, shuffle_tokens=True)
    assert batch[0].numel() > TOKEN_BLOCK
    out = run_kernels(batch, cfg)
    assert_matches_reference(out, shaped_advantages_reference(*batch, cfg), batch[2], batch[4])


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grouped_batch_skips_tiles(norm_by_std):
    """Sorted, contiguous groups over several trajectory tiles (the tile-skipping fast path) and one group
    spanning tiles."""
    cfg = replace(CONFIGS["bao"], norm_by_std=norm_by_std)
    rewards, answers, offsets, _, token_turns = make_batch(200, 3)
    groups = torch.cat([torch.arange(150) // 8 * 1000, torch.full((50,), -7)]).long()
    batch = (rewards, answers, offsets, groups, token_turns)
    out = run_kernels(batch, cfg)
    assert_matches_reference(out, shaped_advantages_reference(*batch, cfg), offsets, token_turns)


def test_single_trajectory_without_tokens():
    cfg = CONFIGS["bao"]
    batch = (
        torch.tensor([0.0], dtype=torch.float32),
        torch.tensor([True]),
        torch.tensor([0, 1], dtype=torch.int32),
        torch.tensor([42], dtype=torch.int64),
        torch.empty(0, dtype=torch.int32),
    )
    token_adv, credits, scores, normalized = run_kernels(batch, cfg)
    ref = shaped_advantages_reference(*batch, cfg)
    assert token_adv.numel() == 0
    torch.testing.assert_close(credits.double(), ref.turn_credits)
    torch.testing.assert_close(normalized.double(), ref.normalized_scores)  # a group of one: Â = S
    torch.testing.assert_close(normalized, scores)


@pytest.mark.parametrize("name", ["r2g-r2g", "em-mean-drgrpo", "bao"])
def test_float64_rewards_get_float64_coefficients(name):
    """fp64 rewards are shaped in fp64 throughout: the coefficients (gamma, λ_IS, λ_OT, eps, BAO's 0.2, EM's
    1 - e^-2) are constants of the rewards' dtype, not fp32 (which left ~1e-8 relative errors)."""
    cfg = replace(CONFIGS[name], gamma=0.9 if name == "r2g-r2g" else 1.0, eps=1.1e-6)
    rewards, answers, offsets, groups, token_turns = make_batch(97, 4)
    rewards = rewards.double() + torch.linspace(0.0, 0.3, rewards.numel(), dtype=torch.float64)  # not dyadic
    batch = (rewards, answers, offsets, groups, token_turns)
    out = run_kernels(batch, cfg)
    assert [t.dtype for t in out] == [torch.float64] * 4
    assert_matches_reference(out, shaped_advantages_reference(*batch, cfg), offsets, token_turns, tol=1e-12)
