"""``bao_fast.train.loss_scale``: float16 gradients underflow without it and match float64 with it; power-of-two
scaling is exact in float32; the scale backs off on overflow down to its floor, grows after a run of finite
updates, round-trips through a checkpoint, and is on exactly when ``optim.loss_scale`` says."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from bao_fast.config import load_config
from bao_fast.train.loss_scale import LossScale, loss_scale_for


def float16_gradient(scale: LossScale) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 master weights computed in float16 (as FSDP's mixed precision does) into a float32 objective (as
    the log-prob op's outputs are) of RL size: a mean over 10^5 tokens. Returns (the float32 weight gradient,
    its float64 value)."""
    gen = torch.Generator().manual_seed(0)
    master = nn.Parameter(torch.rand(64, generator=gen) + 0.5)
    inputs = torch.rand(64, generator=gen) * 1e-2
    objective = (master.to(torch.float16) * inputs.to(torch.float16)).float().sum() / 1e5
    scale.scaled(objective).backward()
    holder = nn.Module()
    holder.master = master
    scale.unscale_(holder)
    return master.grad, inputs.to(torch.float16).double() / 1e5


def test_float16_gradients_underflow_unscaled_and_match_float64_scaled() -> None:
    unscaled, exact = float16_gradient(LossScale(enabled=False))
    relative_error = (unscaled.double() - exact).abs() / exact
    assert unscaled.dtype == torch.float32 and relative_error.max() == 1.0  # flushed to 0 or a subnormal step
    assert (unscaled == 0).any() and relative_error.mean() > 0.2
    scaled, exact = float16_gradient(LossScale(enabled=True))
    torch.testing.assert_close(scaled.double(), exact, rtol=4e-3, atol=0)  # a few float16 roundings


def test_power_of_two_scaling_is_exact_in_float32() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 33, generator=gen)
    grads = []
    for scale in (LossScale(enabled=False), LossScale(enabled=True, init_scale=2.0**20)):
        torch.manual_seed(2)
        model = nn.Sequential(nn.Linear(33, 17), nn.Tanh(), nn.Linear(17, 3))
        scale.scaled(model(x).square().mean()).backward()
        scale.unscale_(model)
        grads.append([p.grad for p in model.parameters()])
    for plain, unscaled in zip(*grads, strict=True):
        torch.testing.assert_close(unscaled, plain, rtol=0, atol=0)


@pytest.mark.usefixtures("single_rank_world")
def test_unscales_fsdp2_sharded_gradients() -> None:
    """FSDP2 parameters have DTensor gradients: unscaling them in place gives the unscaled run's gradients."""
    mesh = init_device_mesh("cpu", (1,))
    x = torch.randn(6, 9, generator=torch.Generator().manual_seed(3))
    grads = []
    for scale in (LossScale(enabled=False), LossScale(enabled=True)):
        torch.manual_seed(4)
        model = fully_shard(nn.Sequential(nn.Linear(9, 5), nn.Linear(5, 2)), mesh=mesh)
        scale.scaled(model(x).square().mean()).backward()
        scale.unscale_(model)
        grads.append([p.grad.full_tensor() for p in model.parameters()])
    for plain, unscaled in zip(*grads, strict=True):
        torch.testing.assert_close(unscaled, plain, rtol=0, atol=0)


def test_a_model_without_gradients_is_left_alone() -> None:
    model = nn.Linear(3, 2)
    LossScale(enabled=True).unscale_(model)
    assert all(p.grad is None for p in model.parameters())


def test_disabled_changes_nothing() -> None:
    scale = LossScale(enabled=False)
    objective = torch.tensor(3.0)
    assert scale.scaled(objective) is objective and scale.scale == 1.0
    assert not scale.back_off()
    scale.grow()
    assert scale.scale == 1.0


def test_backs_off_to_its_floor_then_leaves_nonfinite_gradients_to_the_model() -> None:
    scale = LossScale(enabled=True, init_scale=8.0, min_scale=2.0, growth_interval=3)
    scale.grow()
    assert scale.back_off() and scale.scale == 4.0 and scale.good_updates == 0
    assert scale.back_off() and scale.scale == 2.0
    assert not scale.back_off() and scale.scale == 2.0  # at the floor: a non-finite step of the model


def test_only_a_finite_loss_with_non_finite_gradients_is_an_overflow() -> None:
    scale = LossScale(enabled=True, init_scale=8.0)
    assert not scale.absorb_overflow(0.5, 3.0) and scale.scale == 8.0  # a finite update
    assert not scale.absorb_overflow(float("nan"), float("inf")) and scale.scale == 8.0  # the model diverged
    assert scale.absorb_overflow(0.5, float("inf")) and scale.scale == 4.0


def test_grows_after_a_run_of_finite_updates_up_to_its_ceiling() -> None:
    scale = LossScale(enabled=True, init_scale=4.0, max_scale=8.0, growth_interval=3)
    for _ in range(2):
        scale.grow()
    assert scale.scale == 4.0 and scale.good_updates == 2
    scale.grow()
    assert scale.scale == 8.0 and scale.good_updates == 0
    for _ in range(6):
        scale.grow()
    assert scale.scale == 8.0


def test_a_skipped_non_finite_update_breaks_the_run_of_finite_ones() -> None:
    """"In a row": finite, NaN-loss skip (not an overflow), finite must not double the scale at interval 2."""
    scale = LossScale(enabled=True, init_scale=1024.0, growth_interval=2)
    scale.grow()
    assert not scale.absorb_overflow(float("nan"), float("nan")) and scale.good_updates == 0
    scale.grow()
    assert scale.scale == 1024.0 and scale.good_updates == 1
    assert not scale.absorb_overflow(0.5, 3.0) and scale.good_updates == 1  # a finite update keeps the run
    scale.grow()
    assert scale.scale == 2048.0


def test_state_round_trips() -> None:
    scale = LossScale(enabled=True, growth_interval=5)
    scale.back_off()
    scale.grow()
    restored = LossScale(enabled=True, growth_interval=5)
    restored.load_state_dict(scale.state_dict())
    assert (restored.scale, restored.good_updates) == (2.0**15, 1)


@pytest.mark.parametrize(
    ("mode", "dtype", "enabled"),
    [("auto", torch.float16, True), ("auto", torch.bfloat16, False), ("auto", torch.float32, False),
     ("dynamic", torch.float32, True), ("none", torch.float16, False)],
)
def test_config_decides_when_to_scale(mode: str, dtype: torch.dtype, enabled: bool) -> None:
    cfg = load_config(None, ["model.tiny=true", f"optim.loss_scale={mode}", f"sft.optim.loss_scale={mode}"])
    assert loss_scale_for(cfg.optim, dtype).enabled is enabled
    assert loss_scale_for(cfg.sft.optim, dtype).enabled is enabled


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"init_scale": 0.5}, "1 <= min_scale <= init_scale"), ({"init_scale": 2.0**30}, "init_scale <= max_scale"),
     ({"growth_interval": 0}, "growth_interval must be >= 1")],
)
def test_bad_settings_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LossScale(enabled=True, **kwargs)


def test_a_float16_objective_is_refused() -> None:
    with pytest.raises(ValueError, match=r"objective must be float32 or float64, got torch\.float16"):
        LossScale(enabled=True).scaled(torch.ones((), dtype=torch.float16))
