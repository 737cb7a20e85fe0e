"""Public ``shaped_advantages``: the vectorised CPU path against the fp64 reference, BAO's invariants,
validation errors and torch.compile / torch.library registration."""

from __future__ import annotations

import math

import pytest
import torch

from bao_fast.algo.shaping import ShapingConfig, preset
from bao_fast.ops import ShapedAdvantages, shaped_advantages
from bao_fast.ops.reference import shaped_advantages_reference

HORIZON = 5


def random_batch(num_traj: int, seed: int, dtype: torch.dtype = torch.float32):
    """Random packed batch: T' uniform in 0..HORIZON, dyadic rewards (exact sums), int64 group ids drawn
    from a few arbitrary values (groups of varied sizes, non-adjacent members), a duplicated trajectory
    pair sharing a group of its own (std 0), 0-4 tokens per turn with untrained tokens in between."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, HORIZON + 1, (num_traj,), generator=gen)
    lengths[:2] = HORIZON
    num_turns = int(lengths.sum())
    pool = torch.tensor([0.0, 0.0, 0.0, 1.0, -0.5, 0.5], dtype=dtype)
    rewards = pool[torch.randint(0, len(pool), (num_turns,), generator=gen)]
    rewards[HORIZON : 2 * HORIZON] = rewards[:HORIZON]
    answers = torch.rand(num_turns, generator=gen) < 0.6
    answers[HORIZON : 2 * HORIZON] = answers[:HORIZON]
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).int()
    palette = torch.tensor([-(2**40), 3, 17, 2**50, -1])
    groups = palette[torch.randint(0, len(palette), (num_traj,), generator=gen)]
    groups[:2] = 99
    groups[-1] = 12345  # a group of one
    per_turn = torch.randint(0, 5, (num_turns,), generator=gen)
    token_turns = torch.repeat_interleave(torch.arange(num_turns), per_turn)
    gaps = torch.rand(token_turns.numel(), generator=gen) < 0.2
    token_turns = torch.where(gaps, -1, token_turns).int()
    return rewards, answers, offsets, groups, token_turns


CONFIGS = [
    preset("bao", horizon=HORIZON),
    preset("userrl", horizon=HORIZON),
    ShapingConfig("em", "r2g", gamma=0.7, info_seeking_coef=0.02, overthinking_coef=0.1, horizon=HORIZON),
    ShapingConfig("r2g", "mean", overthinking_coef=0.05, horizon=HORIZON, norm_by_std=False, eps=1e-3),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.turn_credit}-{c.score}-{c.norm_by_std}")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cpu_matches_reference_fp64(cfg, seed):
    batch = random_batch(61, seed, torch.float64)
    out = shaped_advantages(*batch, cfg)
    ref = shaped_advantages_reference(*batch, cfg)
    assert isinstance(out, ShapedAdvantages)
    for name in ShapedAdvantages._fields:
        got, want = getattr(out, name), getattr(ref, name)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=lambda m, n=name: f"{n}: {m}")
    assert out.normalized_scores[0] == 0 and out.normalized_scores[1] == 0  # identical pair: std 0
    single = out.scores[-1] / (1 + cfg.eps) if cfg.norm_by_std else out.scores[-1]
    torch.testing.assert_close(out.normalized_scores[-1], single)  # a group of one: mean 0, std 1


def test_cpu_float32_matches_reference():
    cfg = CONFIGS[0]
    batch = random_batch(80, 5)
    out = shaped_advantages(*batch, cfg)
    ref = shaped_advantages_reference(*batch, cfg)
    for got, want in zip(out, ref):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_token_mean_over_credited_tokens_is_group_advantage():
    """BAO.md: the mean of A_j over a trajectory's trained tokens with non-zero credit equals Â."""
    cfg = preset("bao", horizon=HORIZON)
    rewards, _, offsets, groups, token_turns = batch = random_batch(90, 11, torch.float64)
    out = shaped_advantages(*batch, cfg)
    owner = torch.searchsorted(offsets.long(), torch.arange(rewards.numel()), right=True) - 1
    checked = 0
    for b in range(groups.numel()):
        turns_of_b = (owner == b).nonzero().flatten()
        tokens = torch.isin(token_turns.long(), turns_of_b)
        credited = tokens & (out.turn_credits[token_turns.clamp(min=0).long()] != 0)
        if credited.any() and out.turn_credits[turns_of_b].sum() != 0:
            torch.testing.assert_close(out.token_advantages[credited].mean(), out.normalized_scores[b])
            checked += 1
        else:
            assert bool((out.token_advantages[tokens] == 0).all())
    assert checked > 10


def test_penalties_push_failures_down():
    """A failed, early-ended trajectory with consecutive answers gets negative r2g credits under BAO and no
    signal under plain R2G (all credits 0)."""
    failed = (
        torch.zeros(3),
        torch.tensor([True, True, True]),
        torch.tensor([0, 3], dtype=torch.int32),
        torch.tensor([0]),
        torch.tensor([0, 0, 1, 2, 2], dtype=torch.int32),
    )
    bao = shaped_advantages(*failed, preset("bao", horizon=HORIZON))
    plain = shaped_advantages(*failed, ShapingConfig("r2g", "sum", horizon=HORIZON))
    assert bool((bao.turn_credits[1:] < 0).all()) and bao.scores[0] < 0
    assert bool((plain.turn_credits == 0).all()) and bool((plain.token_advantages == 0).all())


def test_torch_compile_and_opcheck():
    cfg = CONFIGS[0]
    batch = random_batch(20, 3)
    compiled = torch.compile(lambda *a: shaped_advantages(*a, cfg), backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(*batch), shaped_advantages(*batch, cfg)):
        torch.testing.assert_close(got, want)
    args = (*batch, cfg.turn_credit, cfg.score, cfg.gamma, cfg.info_seeking_coef, cfg.overthinking_coef,
            cfg.horizon, cfg.norm_by_std, cfg.eps)  # fmt: skip
    torch.library.opcheck(torch.ops.bao_fast.shaped_advantages.default, args)


def test_torch_compile_with_dynamic_shapes():
    """One dynamic-shape graph serves batches of other sizes (trajectories, turns, tokens) exactly."""
    cfg = CONFIGS[0]
    compiled = torch.compile(lambda *a: shaped_advantages(*a, cfg), backend="aot_eager", fullgraph=True,
                             dynamic=True)
    for trajectories, seed in ((20, 3), (33, 5), (12, 2)):
        batch = random_batch(trajectories, seed)
        for got, want in zip(compiled(*batch), shaped_advantages(*batch, cfg), strict=True):
            torch.testing.assert_close(got, want)


def _bad(batch, index, value):
    items = list(batch)
    items[index] = value
    return items


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda b: _bad(b, 0, b[0].double().half()), TypeError, "turn_rewards"),
        (lambda b: _bad(b, 1, b[1].int()), TypeError, "turn_is_answer"),
        (lambda b: _bad(b, 1, b[1][:-1]), ValueError, "turn_is_answer"),
        (lambda b: _bad(b, 2, b[2].long()), TypeError, "turn_offsets"),
        (lambda b: _bad(b, 2, b[2][:-1]), ValueError, "turn_offsets"),
        (lambda b: _bad(b, 2, b[2].flip(0)), ValueError, "turn_offsets"),
        (lambda b: _bad(b, 3, b[3].int()), TypeError, "group_ids"),
        (lambda b: _bad(b, 3, b[3][None]), ValueError, "group_ids"),
        (lambda b: _bad(b, 3, b[3].to("meta")), ValueError, r"group_ids is on meta, expected cpu \(turn_rewards'"),
        (lambda b: _bad(b, 3, b[3][:0]), ValueError, "group_ids must hold at least one trajectory"),
        (lambda b: _bad(b, 4, b[4] + 10_000), ValueError, r"token_turn_ids must lie in \[-1, M\)"),
        (lambda b: _bad(b, 4, torch.cat([b[4], b[4].new_tensor([-2])])), ValueError, r"token_turn_ids must lie in \["),
        (lambda b: _bad(b, 4, b[4].tolist()), TypeError, "token_turn_ids"),
    ],
)
def test_bad_inputs_raise(mutate, error, match):
    batch = random_batch(10, 0)
    with pytest.raises(error, match=match):
        shaped_advantages(*mutate(batch), CONFIGS[0])


def test_bad_config_raises():
    with pytest.raises(TypeError, match="cfg"):
        shaped_advantages(*random_batch(4, 0), {"turn_credit": "r2g"})
    with pytest.raises(ValueError, match="turn_credit"):
        ShapingConfig("bogus")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_reference_without_host_sync():
    cfg = preset("bao", horizon=HORIZON)
    batch = random_batch(300, 4)
    cuda_batch = [t.cuda() for t in batch]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = shaped_advantages(*cuda_batch, cfg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = shaped_advantages_reference(*batch, cfg)
    for got, want in zip(out, ref):
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-5)


def test_bao_shaping_of_a_hand_worked_batch():
    """BAO.md's stage 2 worked by hand (BAO preset, T = 4): the reference and the op both give these numbers.

    A (group 0): rewards 0, 0, 1, choices ask, answer, answer; solved, so no penalty. r2g credits (γ = 0.8):
        c = (0.64, 0.8, 1), S = 1.
    B (group 0): rewards 0, 0, both answers; failed and ended at T' = 2 < 4. Information seeking: p_2 -= 0.005;
        over-thinking: P = 0.05 (4 - 2) + 0.2 = 0.3, p_2 -= P / 3 = 0.1. r̃ = (0, -0.105), c = (-0.084, -0.105),
        S = -0.105.
    C (group 1, alone): reward 0, an answer, T' = 1: p_1 -= 0.5, c = (-0.5,), S = -0.5; a group of one has
        mean 0 and std 1.
    Group 0: mean 0.4475, Bessel std 0.5525·√2, so Â = ±0.5525 / (0.5525·√2 + 1e-6).
    Tokens per turn: A (3, 2, 4): N = 9, C = 7.52; B (2, 5): N = 7, C = -0.693; C (3,): N = 3, C = -1.5.
    """
    rewards = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    answers = torch.tensor([False, True, True, True, True, True])
    offsets = torch.tensor([0, 3, 5, 6], dtype=torch.int32)
    groups = torch.tensor([0, 0, 1])
    tokens_per_turn = [3, 2, 4, 2, 5, 3]
    token_turns = torch.tensor([-1] + [t for t, n in enumerate(tokens_per_turn) for _ in range(n)] + [-1],
                               dtype=torch.int32)  # fmt: skip
    a_hat = 0.5525 / (0.5525 * 2**0.5 + 1e-6)
    credits = [0.64, 0.8, 1.0, -0.084, -0.105, -0.5]
    scale = [a_hat * 9 / 7.52] * 3 + [-a_hat * 7 / -0.693] * 2 + [(-0.5 / (1 + 1e-6)) * 3 / -1.5]
    expected_tokens = [0.0] + [credits[t] * scale[t] for t, n in enumerate(tokens_per_turn) for _ in range(n)] + [0.0]
    cfg = preset("bao", horizon=4)
    for out in (shaped_advantages_reference(rewards, answers, offsets, groups, token_turns, cfg),
                shaped_advantages(rewards, answers, offsets, groups, token_turns, cfg)):  # fmt: skip
        torch.testing.assert_close(out.turn_credits, torch.tensor(credits, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.scores, torch.tensor([1.0, -0.105, -0.5], dtype=torch.float64),
                                   rtol=1e-12, atol=1e-12)  # fmt: skip
        torch.testing.assert_close(out.normalized_scores, torch.tensor([a_hat, -a_hat, -0.5 / (1 + 1e-6)],
                                   dtype=torch.float64), rtol=1e-12, atol=1e-12)  # fmt: skip
        torch.testing.assert_close(out.token_advantages, torch.tensor(expected_tokens, dtype=torch.float64),
                                   rtol=1e-12, atol=1e-12)  # fmt: skip


def test_em_credits_and_mean_scores_of_a_hand_worked_batch():
    """``em`` credits c = 0.5 + 0.5 (1 - e^(-2 r̃)) / (1 - e^-2), ``mean`` scores, no std (Dr.GRPO), by hand:
    X: rewards (0, 1), c = (0.5, 1), S = 0.5; Y: reward 0.25, c = 0.5 + 0.5 (1 - e^-0.5) / (1 - e^-2), S = 0.25.
    Â = S - 0.375 = ±0.125. Tokens X (1, 2): N = 3, C = 2.5; Y (2,): N = 2, C = 2c, so A = -0.125."""
    c_y = 0.5 + 0.5 * (1 - math.exp(-0.5)) / (1 - math.exp(-2))
    rewards = torch.tensor([0.0, 1.0, 0.25], dtype=torch.float64)
    answers = torch.tensor([False, True, True])
    offsets = torch.tensor([0, 2, 3], dtype=torch.int32)
    token_turns = torch.tensor([-1, 0, -1, 1, 1, -1, 2, 2], dtype=torch.int32)
    expected = [0.0, 0.5 * 0.125 * 3 / 2.5, 0.0, 0.125 * 3 / 2.5, 0.125 * 3 / 2.5, 0.0, -0.125, -0.125]
    cfg = ShapingConfig("em", "mean", horizon=4, norm_by_std=False)
    for out in (shaped_advantages_reference(rewards, answers, offsets, torch.tensor([7, 7]), token_turns, cfg),
                shaped_advantages(rewards, answers, offsets, torch.tensor([7, 7]), token_turns, cfg)):  # fmt: skip
        torch.testing.assert_close(out.turn_credits, torch.tensor([0.5, 1.0, c_y], dtype=torch.float64))
        torch.testing.assert_close(out.scores, torch.tensor([0.5, 0.25], dtype=torch.float64))
        torch.testing.assert_close(out.token_advantages, torch.tensor(expected, dtype=torch.float64))


def test_r2g_scores_of_a_hand_worked_batch():
    """``r2g`` scores S = Σ_t γ^(t-1) r̃_t (BAO.md) with γ = 0.5, by hand. X: rewards (1, 0, 1), S = 1 + 0.25 = 1.25;
    Y: (0, 1), S = 0.5; Z: (0, 0) with two answers, failed: information seeking gives r̃ = (0, -0.1), S = -0.05.
    X and Y share a group: mean 0.875, Bessel std 0.375·√2; Z is alone: Â = S / (1 + eps)."""
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    answers = torch.tensor([False, False, True, False, True, True, True])
    offsets = torch.tensor([0, 3, 5, 7], dtype=torch.int32)
    batch = (rewards, answers, offsets, torch.tensor([4, 4, 9]), torch.arange(7, dtype=torch.int32))
    cfg = ShapingConfig("equalized", "r2g", gamma=0.5, info_seeking_coef=0.1, horizon=4)
    a_hat = 0.375 / (0.375 * 2**0.5 + 1e-6)
    for out in (shaped_advantages_reference(*batch, cfg), shaped_advantages(*batch, cfg)):
        torch.testing.assert_close(out.scores, torch.tensor([1.25, 0.5, -0.05], dtype=torch.float64),
                                   rtol=1e-12, atol=1e-12)  # fmt: skip
        torch.testing.assert_close(out.normalized_scores, torch.tensor([a_hat, -a_hat, -0.05 / (1 + 1e-6)],
                                   dtype=torch.float64), rtol=1e-12, atol=1e-12)  # fmt: skip
