"""LR schedules and the AdamW parameter groups of ``bao_fast.train.optim``."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from torch import nn

from bao_fast.config import OptimConfig
from bao_fast.train.optim import advance_schedule, build_optimizer, build_scheduler, clip_grad_norm, lr_factor


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_schedule_warmup_then_shape(schedule: str) -> None:
    cfg = OptimConfig(lr=1e-3, warmup_steps=4, schedule=schedule, min_lr_ratio=0.1)
    total = 20
    factors = [lr_factor(s, cfg, total) for s in range(total + 3)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4] == pytest.approx(1.0)
    if schedule == "constant":
        assert all(f == 1.0 for f in factors[4:])
    else:
        tail = factors[4:]
        assert all(a >= b for a, b in itertools.pairwise(tail))
        assert factors[total] == pytest.approx(0.1)
        assert factors[-1] == pytest.approx(0.1)
    if schedule == "cosine":
        mid = 4 + (total - 4) // 2
        assert factors[mid] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_scheduler_drives_optimizer_lr() -> None:
    model = nn.Linear(3, 2)
    cfg = OptimConfig(lr=0.5, warmup_steps=2, schedule="linear")
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=6)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.5 * lr_factor(s, cfg, 6) for s in range(6)])
    with pytest.raises(ValueError, match="total_steps"):
        build_scheduler(opt, cfg, total_steps=0)


def test_schedule_advances_after_a_skipped_first_update_without_torchs_warning() -> None:
    """A run whose first update is skipped still steps the schedule; torch's order warning is for a real
    mistake elsewhere, so only :func:`advance_schedule` silences it (a bare ``scheduler.step()`` still warns)."""
    cfg = OptimConfig(lr=0.5, warmup_steps=4, schedule="constant")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bare = build_scheduler(build_optimizer(nn.Linear(3, 2), cfg), cfg, total_steps=8)
        bare.step()
        assert any("lr_scheduler.step()" in str(w.message) for w in caught)
        caught.clear()
        opt = build_optimizer(nn.Linear(3, 2), cfg)
        sched = build_scheduler(opt, cfg, total_steps=8)
        advance_schedule(sched)  # the first update was skipped: no optimizer.step()
        assert caught == []
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5 * lr_factor(1, cfg, 8)] * 2)


def test_no_weight_decay_on_vectors() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.ndim == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(frozen, OptimConfig())


def test_fused_update_on_cuda_only() -> None:
    assert not build_optimizer(nn.Linear(3, 2), OptimConfig()).defaults["fused"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_update_on_cuda_equals_the_default_one() -> None:
    """The fused CUDA AdamW (decay and no-decay groups) moves the weights as torch's for-loop AdamW does."""
    torch.manual_seed(0)
    models = [nn.Linear(64, 48).cuda() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    fused = build_optimizer(models[0], cfg)
    plain = torch.optim.AdamW([{"params": [models[1].weight], "weight_decay": 0.1},
                               {"params": [models[1].bias], "weight_decay": 0.0}],
                              lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False)
    assert fused.defaults["fused"]
    x = torch.randn(32, 64, device="cuda")
    for _ in range(3):
        for model, opt in zip(models, (fused, plain), strict=True):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_clip_grad_norm_matches_manual_and_flags_nan() -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    model(torch.randn(7, 5)).pow(2).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    expected = torch.sqrt(sum(g.double().pow(2).sum() for g in grads))
    norm = clip_grad_norm(model, max_norm=0.5)
    assert norm.item() == pytest.approx(expected.item(), rel=1e-5)
    clipped = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters()))
    assert clipped.item() == pytest.approx(0.5, rel=1e-4)
    model.weight.grad[0, 0] = float("nan")
    assert not math.isfinite(clip_grad_norm(model, max_norm=0.0).item())
