"""Fused clipped-ratio loss kernel (TRITON_INTERPRET=1 on CPU) against the fp64 autograd reference."""

from __future__ import annotations

import pytest
import torch
from bao_fast.kernels.policy_loss import TOKEN_BLOCK, clipped_ratio_loss_triton

from bao_fast.algo.loss import AGGREGATIONS, KL_TYPES
from bao_fast.ops.policy_loss import STAT_NAMES
from bao_fast.ops.reference import clipped_ratio_loss_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU tensors: the Triton interpreter

OPTIONS = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.05, norm_length=300.0)


pytestmark = pytest.mark.usefixtures("poisoned_outputs")  # launcher buffers start as NaN / 2**30


def make_inputs(lengths: list[int], seed: int, *, spread: float = 0.4):
    """Packed tokens: log-ratios mostly inside the clip range with a tail far beyond the ±20 / ±10 clamps,
    both signs of advantages (dual clip), empty sequences and sequences with no masked token."""
    gen = torch.Generator().manual_seed(seed)
    num_tokens = sum(lengths)
    logp = -torch.rand(num_tokens, generator=gen) * 4
    log_ratio = torch.randn(num_tokens, generator=gen) * spread
    far = torch.rand(num_tokens, generator=gen) < 0.02
    log_ratio[far] = torch.randn(int(far.sum()), generator=gen) * 30
    old_logp = logp - log_ratio
    advantages = torch.randn(num_tokens, generator=gen) * 2
    ref_logp = logp + torch.randn(num_tokens, generator=gen) * 4
    mask = torch.rand(num_tokens, generator=gen) < 0.75
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    if len(lengths) > 2 and lengths[1] > 0:
        mask[cu[1] : cu[2]] = False
    return logp, old_logp, advantages, mask, cu, ref_logp


def reference(logp, old_logp, advantages, mask, cu, ref_logp, **kw):
    leaf = logp.double().requires_grad_()
    ref = ref_logp.double() if ref_logp is not None else None
    loss, stats = clipped_ratio_loss_reference(
        leaf, old_logp.double(), advantages.double(), mask, cu_seqlens=cu, ref_logp=ref, **kw
    )
    loss.backward()
    return loss.detach(), leaf.grad, torch.stack([stats[n] for n in STAT_NAMES])


def check(logp, old_logp, advantages, mask, cu, ref_logp, **kw):
    on_device = [t.to(DEVICE) if t is not None else None for t in (logp, old_logp, advantages, mask, cu, ref_logp)]
    loss, grad, stats = (t.cpu() for t in clipped_ratio_loss_triton(
        *on_device,
        kw["clip_low"], kw["clip_high"], kw["dual_clip"], kw["kl_coef"], kw["kl_type"], kw["agg"], kw["norm_length"],
    ))  # fmt: skip
    want_loss, want_grad, want_stats = reference(logp, old_logp, advantages, mask, cu, ref_logp, **kw)
    assert loss.shape == () and grad.shape == logp.shape and stats.shape == (len(STAT_NAMES),)
    scale = want_grad.abs().max().item() + 1e-30
    torch.testing.assert_close(grad.double(), want_grad, rtol=2e-5, atol=2e-6 * scale)
    torch.testing.assert_close(loss.double(), want_loss, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(stats.double(), want_stats, rtol=2e-5, atol=1e-6)
    return loss, grad, stats


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("kl_type", [*KL_TYPES, None])
def test_kernel_matches_reference(agg, kl_type):
    lengths = [37, 0, 2500, 1, 0, 611, 3, 90]
    logp, old_logp, adv, mask, cu, ref_logp = make_inputs(lengths, seed=len(agg) + 7 * len(kl_type or ""))
    ref_logp = ref_logp if kl_type is not None else None
    kw = dict(OPTIONS, kl_type=kl_type or "k3", agg=agg, kl_coef=OPTIONS["kl_coef"] if kl_type else 0.0)
    _, grad, stats = check(logp, old_logp, adv, mask, cu, ref_logp, **kw)
    assert bool((grad[~mask] == 0).all())
    assert stats[0] > 0 and stats[1] > 0, "inputs must exercise both clips"


def test_many_short_sequences_across_blocks():
    """Hundreds of tiny sequences spanning block boundaries: the per-token sequence search."""
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(0, 12, (700,), generator=gen).tolist()
    assert sum(lengths) > TOKEN_BLOCK
    inputs = make_inputs(lengths, seed=5)
    for agg in ("seq-mean-token-mean", "token-mean"):
        check(*inputs, **dict(OPTIONS, kl_type="k3", agg=agg))


def test_no_masked_token_gives_zero():
    logp, old_logp, adv, mask, cu, ref_logp = make_inputs([50, 70], seed=1)
    mask = torch.zeros_like(mask)
    for agg in AGGREGATIONS:
        loss, grad, stats = check(logp, old_logp, adv, mask, cu, ref_logp, **dict(OPTIONS, kl_type="k2", agg=agg))
        assert loss.item() == 0.0 and bool((grad == 0).all()) and bool((stats == 0).all())


def test_without_cu_seqlens():
    logp, old_logp, adv, mask, _, ref_logp = make_inputs([TOKEN_BLOCK + 5], seed=2)
    check(logp, old_logp, adv, mask, None, ref_logp, **dict(OPTIONS, kl_type="k1", agg="token-mean"))


# -A * inf is NaN where A == 0 (padding lanes included); the kernel never selects it (the dual clip needs A < 0),
# but the interpreter's NumPy warns on computing it.
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_infinite_dual_clip(agg):
    """dual_clip=inf (the dual clip off, as the public op allows) matches the reference: no NaN from -A * inf."""
    inputs = make_inputs([40, 0, 300, 9], seed=4)
    _, _, stats = check(*inputs, **dict(OPTIONS, kl_type="k3", agg=agg, dual_clip=float("inf")))
    assert stats[1] == 0 and stats[0] > 0


@pytest.mark.parametrize("kl_type", ["k1", "k3"])
def test_float64_clip_boundaries_and_coefficients_are_float64(kl_type):
    """fp64 log-probs are clipped at fp64 bounds: ratios 2e-8 beyond 1 + clip_high / 1 - clip_low are clipped
    as the reference clips them (fp32 coefficients moved the bounds by ~3e-9 and let them through), and the
    loss matches to fp64 precision."""
    ratios = torch.tensor([1.28 + 2e-8, 1.28 - 2e-8, 0.8 - 2e-8, 0.8 + 2e-8, 1.0, 3.3], dtype=torch.float64)
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.7, -0.9], dtype=torch.float64)
    logp = torch.linspace(-3.0, -0.1, 6, dtype=torch.float64)
    old_logp = logp - ratios.log()
    ref_logp = logp + 0.123456789
    mask = torch.ones(6, dtype=torch.bool)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    kw = {**OPTIONS, "clip_low": 0.2, "clip_high": 0.28, "dual_clip": 3.1, "kl_coef": 0.0123456789,
          "kl_type": kl_type, "agg": "token-mean"}  # fmt: skip
    on_device = [t.to(DEVICE) for t in (logp, old_logp, advantages, mask, cu, ref_logp)]
    loss, grad, stats = (t.cpu() for t in clipped_ratio_loss_triton(
        *on_device,
        kw["clip_low"], kw["clip_high"], kw["dual_clip"], kw["kl_coef"], kw["kl_type"], kw["agg"], kw["norm_length"],
    ))  # fmt: skip
    want_loss, want_grad, want_stats = reference(logp, old_logp, advantages, mask, cu, ref_logp, **kw)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(stats, want_stats, rtol=1e-12, atol=1e-14)
    assert stats[STAT_NAMES.index("clipfrac")].item() > 0
