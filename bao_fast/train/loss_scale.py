"""Dynamic loss scaling for float16 training (``optim.loss_scale``).

In float16 the backward of an RL objective underflows: a token-mean over ~10^5 tokens gives each log-prob a
gradient near 1e-5, below float16's smallest normal number (6e-5), and the layers below see less. The
objective is multiplied by ``scale`` before ``backward`` and the gradients divided by it after (powers of two:
exact in float32, where the gradients are reduced and kept). An update whose loss is finite but gradient
norm is not overflowed: it is skipped and the scale halved (``back_off``), and only at ``min_scale`` does it
count as a non-finite step; ``growth_interval`` finite updates in a row double the scale (``grow``).
bfloat16 has float32's exponent range and needs none of this.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bao_fast.config import OptimConfig


class LossScale:
    """The running scale; disabled, a no-op with scale 1 (``scaled`` returns the objective itself)."""

    def __init__(
        self,
        enabled: bool,
        init_scale: float = 2.0**16,
        growth_interval: int = 1000,
        min_scale: float = 1.0,
        max_scale: float = 2.0**24,
    ) -> None:
        if not 1.0 <= min_scale <= init_scale <= max_scale:
            raise ValueError(f"need 1 <= min_scale <= init_scale <= max_scale, got {min_scale}, {init_scale}, "
                             f"{max_scale}")
        if growth_interval < 1:
            raise ValueError(f"growth_interval must be >= 1, got {growth_interval}")
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_interval = growth_interval
        self.min_scale, self.max_scale = min_scale, max_scale
        self.good_updates = 0  # finite updates since the scale last changed

    def scaled(self, objective: torch.Tensor) -> torch.Tensor:
        """``objective`` × scale: call ``backward`` on this. ``objective``: float32 or float64 (the gradient it
        sends back equals the scale, which float16 cannot hold); ValueError otherwise when enabled."""
        if not self.enabled:
            return objective
        if objective.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"objective must be float32 or float64, got {objective.dtype}")
        return objective * self.scale

    def unscale_(self, model: nn.Module) -> None:
        """Divide ``model``'s gradients (local shards of DTensors included) by the scale, in place."""
        grads = [p.grad for p in model.parameters() if p.grad is not None] if self.enabled else []
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def grow(self) -> None:
        """Count a finite update: the ``growth_interval``-th in a row doubles the scale (up to ``max_scale``)."""
        if self.enabled:
            self.good_updates += 1
            if self.good_updates >= self.growth_interval:
                self.scale = min(self.scale * 2.0, self.max_scale)
                self.good_updates = 0

    def back_off(self) -> bool:
        """After non-finite gradients of a finite loss: halve the scale and return True (an overflow: skip the
        update, it is not a non-finite step). False when disabled or already at ``min_scale``: then the
        gradients are the model's, not the scale's."""
        if not self.enabled or self.scale <= self.min_scale:
            return False
        self.scale = max(self.scale / 2.0, self.min_scale)
        self.good_updates = 0
        return True

    def absorb_overflow(self, loss: float, grad_norm: float) -> bool:
        """The trainers' rule after an update's backward: True (and the scale backed off) when a finite ``loss``
        has a non-finite ``grad_norm`` that the scale caused (see ``back_off``); False otherwise. Any
        non-finite value ends the run of finite updates that ``grow`` counts."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.good_updates = 0
        return math.isfinite(loss) and not math.isfinite(grad_norm) and self.back_off()

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "good_updates": self.good_updates}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale = float(state["scale"])
        self.good_updates = int(state["good_updates"])


def loss_scale_for(cfg: OptimConfig, compute_dtype: torch.dtype) -> LossScale:
    """``optim.loss_scale``: ``auto`` scales when training computes in float16, ``dynamic`` always (any dtype:
    exact, since the scale is a power of two), ``none`` never."""
    mode = cfg.loss_scale
    return LossScale(mode == "dynamic" or (mode == "auto" and compute_dtype == torch.float16))
