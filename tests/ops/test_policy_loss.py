"""Public ``clipped_ratio_loss``: the CPU path against the fp64 autograd reference, gradcheck, autograd
scaling, stats, validation errors and torch.compile / torch.library registration."""

from __future__ import annotations

import math

import pytest
import torch

from bao_fast.algo.loss import AGGREGATIONS, KL_TYPES
from bao_fast.ops import clipped_ratio_loss
from bao_fast.ops.policy_loss import STAT_NAMES
from bao_fast.ops.reference import clipped_ratio_loss_reference

OPTIONS = dict(clip_low=0.15, clip_high=0.3, dual_clip=2.5, kl_coef=0.1, norm_length=64.0)


def make_inputs(lengths: list[int], seed: int, dtype: torch.dtype = torch.float64, *, far: bool = True):
    """Packed tokens with log-ratios inside and outside the clip range (and beyond the ±20 / ±10 clamps when
    ``far``), advantages of both signs, an empty sequence and a sequence without masked tokens."""
    gen = torch.Generator().manual_seed(seed)
    num_tokens = sum(lengths)
    logp = -torch.rand(num_tokens, generator=gen, dtype=torch.float64) * 3
    log_ratio = torch.randn(num_tokens, generator=gen, dtype=torch.float64) * 0.5
    if far:
        log_ratio[::17] *= 60
    advantages = torch.randn(num_tokens, generator=gen, dtype=torch.float64)
    ref_logp = logp + torch.randn(num_tokens, generator=gen, dtype=torch.float64) * (5 if far else 1)
    mask = torch.rand(num_tokens, generator=gen) < 0.8
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    mask[cu[1] : cu[2]] = False
    logp, old_logp, advantages, ref_logp = (t.to(dtype) for t in (logp, logp - log_ratio, advantages, ref_logp))
    return logp, old_logp, advantages, mask, cu, ref_logp


def kwargs(agg: str, kl_type: str | None, cu: torch.Tensor, ref_logp: torch.Tensor) -> dict:
    return dict(
        OPTIONS, cu_seqlens=cu, agg=agg, kl_type=kl_type or "k3", ref_logp=ref_logp if kl_type else None,
        kl_coef=OPTIONS["kl_coef"] if kl_type else 0.0,
    )  # fmt: skip


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("kl_type", [*KL_TYPES, None])
def test_loss_grad_stats_match_reference(agg, kl_type):
    logp, old_logp, adv, mask, cu, ref_logp = make_inputs([20, 13, 0, 1, 150, 7], seed=len(agg))
    kw = kwargs(agg, kl_type, cu, ref_logp)
    leaf = logp.clone().requires_grad_()
    loss, stats = clipped_ratio_loss(leaf, old_logp, adv, mask, **kw)
    (3.0 * loss).backward()
    ref_leaf = logp.clone().requires_grad_()
    want_loss, want_stats = clipped_ratio_loss_reference(ref_leaf, old_logp, adv, mask, **kw)
    (3.0 * want_loss).backward()
    torch.testing.assert_close(loss.detach(), want_loss.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-10, atol=1e-12)
    assert set(stats) == set(STAT_NAMES)
    for name in STAT_NAMES:
        assert stats[name].shape == () and stats[name].grad_fn is None
        torch.testing.assert_close(stats[name], want_stats[name], rtol=1e-10, atol=1e-12)
    assert stats["clipfrac"] > 0 and stats["clipfrac_lower"] > 0


def test_float32_matches_reference():
    logp, old_logp, adv, mask, cu, ref_logp = make_inputs([300, 41, 5], seed=4, dtype=torch.float32)
    leaf = logp.clone().requires_grad_()
    loss, _ = clipped_ratio_loss(leaf, old_logp, adv, mask, cu_seqlens=cu, ref_logp=ref_logp, kl_coef=0.1)
    loss.backward()
    ref_leaf = logp.double().requires_grad_()
    want, _ = clipped_ratio_loss_reference(
        ref_leaf, old_logp.double(), adv.double(), mask, ref_logp=ref_logp.double(), kl_coef=0.1
    )
    want.backward()
    assert loss.dtype == torch.float32 and leaf.grad.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_gradcheck(agg):
    """Finite differences in fp64 (inputs away from the clip kinks, which gradcheck cannot difference)."""
    logp, old_logp, adv, mask, cu, ref_logp = make_inputs([9, 4, 0, 12, 5], seed=9, far=False)
    ratio = (logp - old_logp).exp()
    for bound in (1 - OPTIONS["clip_low"], 1 + OPTIONS["clip_high"]):
        near = (ratio - bound).abs() < 1e-3
        old_logp = torch.where(near, old_logp - 0.01, old_logp)
    kw = kwargs(agg, "k3", cu, ref_logp)
    assert torch.autograd.gradcheck(
        lambda x: clipped_ratio_loss(x, old_logp, adv, mask, **kw)[0], (logp.clone().requires_grad_(),)
    )


def test_torch_compile_and_opcheck():
    logp, old_logp, adv, mask, cu, ref_logp = make_inputs([30, 10, 25], seed=2, dtype=torch.float32)
    kw = kwargs("seq-mean-token-mean", "k2", cu, ref_logp)
    compiled = torch.compile(
        lambda x: clipped_ratio_loss(x, old_logp, adv, mask, **kw)[0], backend="aot_eager", fullgraph=True
    )
    a, b = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    compiled(a).backward()
    clipped_ratio_loss(b, old_logp, adv, mask, **kw)[0].backward()
    torch.testing.assert_close(a.grad, b.grad)
    leaf = b.detach().requires_grad_()
    args = (leaf, old_logp, adv, mask, cu, ref_logp, 0.2, 0.2, 3.0, 0.1, "k3", "token-mean", None)
    torch.library.opcheck(torch.ops.bao_fast.clipped_ratio_loss.default, args)


def test_torch_compile_with_dynamic_shapes():
    """fullgraph + dynamic=True: the scalar options are SymFloats there, which math.isfinite cannot take."""

    def f(x, old_logp, adv, mask):
        return clipped_ratio_loss(x, old_logp, adv, mask, clip_high=0.28, kl_coef=0.05, ref_logp=old_logp)[0]

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for lengths in ([30, 10], [7, 50, 3], [64, 9]):
        logp, old_logp, adv, mask, _, _ = make_inputs(lengths, seed=len(lengths))
        a, b = logp.clone().requires_grad_(), logp.clone().requires_grad_()
        got, want = compiled(a, old_logp, adv, mask), f(b, old_logp, adv, mask)
        got.backward()
        want.backward()
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(a.grad, b.grad)


def _call(**overrides):
    logp, old_logp, adv, mask, cu, ref_logp = make_inputs([6, 5, 4], seed=0, dtype=torch.float32)
    args = dict(logp=logp, old_logp=old_logp, advantages=adv, mask=mask)
    kw = dict(cu_seqlens=cu, ref_logp=ref_logp)
    for key, value in overrides.items():
        (args if key in args else kw)[key] = value(args.get(key, kw.get(key))) if callable(value) else value
    return clipped_ratio_loss(*args.values(), **kw)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        (dict(logp=lambda t: t.half()), TypeError, "logp"),
        (dict(logp=lambda t: t.tolist()), TypeError, "logp must be a torch.Tensor, got list"),
        (dict(old_logp=lambda t: t.to("meta")), ValueError, r"old_logp is on meta, expected cpu \(logp's device\)"),
        (dict(cu_seqlens=lambda t: t.to("meta")), ValueError, r"cu_seqlens is on meta, expected cpu \(logp's"),
        (dict(cu_seqlens=lambda t: t[:1]), ValueError, r"cu_seqlens must have B\+1 >= 2 entries, got 1"),
        (dict(kl_coef=-0.1), ValueError, "kl_coef must be >= 0, got -0.1"),
        (dict(logp=lambda t: t[None]), ValueError, "logp"),
        (dict(old_logp=lambda t: t.double()), TypeError, "old_logp"),
        (dict(advantages=lambda t: t[:-1]), ValueError, "advantages"),
        (dict(mask=lambda t: t.float()), TypeError, "mask"),
        (dict(ref_logp=lambda t: t[1:]), ValueError, "ref_logp"),
        (dict(cu_seqlens=lambda t: t.long()), TypeError, "cu_seqlens"),
        (dict(cu_seqlens=lambda t: t[:-1]), ValueError, "cu_seqlens"),
        (dict(cu_seqlens=None, agg="seq-mean-token-sum"), ValueError, "cu_seqlens"),
        (dict(agg="sum"), ValueError, "agg"),
        (dict(kl_type="k4"), ValueError, "kl_type"),
        (dict(clip_low=-0.1), ValueError, "clip_low"),
        (dict(dual_clip=1.0), ValueError, "dual_clip"),
        (dict(kl_coef=0.1, ref_logp=None), ValueError, "ref_logp"),
        (dict(agg="seq-mean-token-sum-norm"), ValueError, "norm_length"),
        (dict(agg="seq-mean-token-sum-norm", norm_length=float("nan")), ValueError, "norm_length"),
        (dict(agg="seq-mean-token-sum-norm", norm_length=float("inf")), ValueError, "norm_length"),
        (dict(agg="seq-mean-token-sum-norm", norm_length=True), TypeError, "norm_length"),
        (dict(clip_low=float("nan")), ValueError, "clip_low"),
        (dict(clip_high=float("inf")), ValueError, "clip_high"),
        (dict(clip_high="0.2"), TypeError, "clip_high"),
        (dict(dual_clip=float("nan")), ValueError, "dual_clip"),
        (dict(kl_coef=float("nan")), ValueError, "kl_coef"),
        (dict(kl_coef=torch.tensor(0.1)), TypeError, "kl_coef"),
    ],
)
def test_bad_inputs_raise(overrides, error, match):
    with pytest.raises(error, match=match):
        _call(**overrides)


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_infinite_dual_clip_disables_it(agg):
    """dual_clip=inf is the documented way to turn the dual clip off: no clipfrac_lower, reference values."""
    logp, old_logp, adv, mask, cu, ref_logp = make_inputs([20, 13, 0, 40], seed=6)
    kw = dict(kwargs(agg, "k1", cu, ref_logp), dual_clip=float("inf"))
    leaf, ref_leaf = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    loss, stats = clipped_ratio_loss(leaf, old_logp, adv, mask, **kw)
    want, want_stats = clipped_ratio_loss_reference(ref_leaf, old_logp, adv, mask, **kw)
    loss.backward()
    want.backward()
    assert stats["clipfrac_lower"] == 0 and want_stats["clipfrac"] > 0
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-12, atol=1e-12)


def test_double_backward_raises_instead_of_a_zero_hessian():
    """The backward scales a saved d loss / d logp: differentiating it again would silently give 0."""
    logp, old_logp, adv, mask, _, ref_logp = make_inputs([10, 6, 9], seed=8)
    leaf = logp.clone().requires_grad_()
    loss, _ = clipped_ratio_loss(leaf, old_logp, adv, mask, ref_logp=ref_logp, kl_coef=0.1, kl_type="k2")
    with pytest.raises(RuntimeError, match="clipped_ratio_loss does not support double backward"):
        torch.autograd.grad(loss, leaf, create_graph=True)
    (grad,) = torch.autograd.grad(loss, leaf)  # a plain backward still works
    ref_leaf = logp.clone().requires_grad_()
    want, _ = clipped_ratio_loss_reference(ref_leaf, old_logp, adv, mask, ref_logp=ref_logp, kl_coef=0.1,
                                           kl_type="k2")  # fmt: skip
    (want_grad,) = torch.autograd.grad(want, ref_leaf)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_cuda_matches_reference_without_host_sync(agg):
    logp, old_logp, adv, mask, cu, ref_logp = make_inputs([700, 0, 3000, 5, 1200], seed=6, dtype=torch.float32)
    kw = kwargs(agg, "k3", cu, ref_logp)
    leaf = logp.cuda().requires_grad_()
    cuda_kw = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, stats = clipped_ratio_loss(leaf, old_logp.cuda(), adv.cuda(), mask.cuda(), **cuda_kw)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref_leaf = logp.double().requires_grad_()
    kw["ref_logp"] = ref_logp.double()
    want, want_stats = clipped_ratio_loss_reference(ref_leaf, old_logp.double(), adv.double(), mask, **kw)
    want.backward()
    torch.testing.assert_close(loss.cpu().double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad.cpu().double(), ref_leaf.grad, rtol=1e-5, atol=1e-7)
    for name in STAT_NAMES:
        torch.testing.assert_close(stats[name].cpu().double(), want_stats[name], rtol=1e-5, atol=1e-6)


def test_a_hand_worked_batch():
    """The clipped surrogate of BAO.md by hand (clip 0.2 / 0.2, dual clip 3), per token (ρ, A):
    (1.5, 1): clipped high, l = -1.2, dl/dρ = 0;  (0.5, 2): unclipped, l = -1.0, dl/dρ = -2;
    (0.5, -1): clipped low, l = 0.8, dl/dρ = 0;  (4, -1): dual clip, l = 3, dl/dρ = 0;  a masked fifth token.
    k3 KL to ref_logp = logp + d: kl = e^d - d - 1, d kl / d logp = 1 - e^d. Token mean over 4 tokens;
    clipfrac 2/4 (pg2 > pg1 on the first and third), clipfrac_lower 1/4, approx_kl = -log(1.5 · 0.25 · 4) / 4."""
    ratio = torch.tensor([1.5, 0.5, 0.5, 4.0, 7.0], dtype=torch.float64)
    advantages = torch.tensor([1.0, 2.0, -1.0, -1.0, 5.0], dtype=torch.float64)
    d = torch.tensor([0.3, -0.2, 0.0, 0.5, 9.0], dtype=torch.float64)
    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.0], dtype=torch.float64)
    old_logp, ref_logp = logp - ratio.log(), logp + d
    mask = torch.tensor([True, True, True, True, False])
    pg, dpg_dratio = [-1.2, -1.0, 0.8, 3.0], [0.0, -2.0, 0.0, 0.0]
    kl = [math.exp(x) - x - 1 for x in d[:4].tolist()]
    want_loss = (sum(pg) + 0.1 * sum(kl)) / 4
    want_grad = [(g * r + 0.1 * (1 - math.exp(x))) / 4 for g, r, x in zip(dpg_dratio, ratio.tolist(), d.tolist())]
    want_stats = {"clipfrac": 0.5, "clipfrac_lower": 0.25, "approx_kl": -math.log(1.5) / 4, "kl": sum(kl) / 4}
    for fn in (clipped_ratio_loss_reference, clipped_ratio_loss):
        leaf = logp.clone().requires_grad_()
        loss, stats = fn(leaf, old_logp, advantages, mask, ref_logp=ref_logp, kl_coef=0.1, kl_type="k3",
                         clip_low=0.2, clip_high=0.2, dual_clip=3.0, agg="token-mean")  # fmt: skip
        loss.backward()
        torch.testing.assert_close(loss, torch.tensor(want_loss, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(leaf.grad, torch.tensor([*want_grad, 0.0], dtype=torch.float64),
                                   rtol=1e-12, atol=1e-12)  # fmt: skip
        for name, value in want_stats.items():
            assert stats[name].item() == pytest.approx(value, rel=1e-12, abs=1e-12), (fn.__name__, name)
    # seq-mean-token-mean over sequences [0, 2) and [2, 5) (its masked token left out), without KL
    cu_seqlens = torch.tensor([0, 2, 5], dtype=torch.int32)
    loss, _ = clipped_ratio_loss(logp, old_logp, advantages, mask, cu_seqlens=cu_seqlens, agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx(((-1.2 - 1.0) / 2 + (0.8 + 3.0) / 2) / 2, rel=1e-12)
