"""AdamW with decoupled weight decay on matrices only, and warm-up + constant / cosine / linear schedules."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from bao_fast.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; biases and norm weights (ndim < 2) get no weight decay.

    Works on FSDP2-sharded (DTensor) parameters. On CUDA the update is torch's fused kernel (one launch per
    parameter group, as torchtitan runs FSDP2); elsewhere torch's default implementation.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError("build_optimizer: model has no trainable parameters")
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = all(p.is_cuda for p in [*decay, *no_decay]) or None  # None: torch's default
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of ``cfg.lr`` at optimiser step ``step`` (0-based): linear warm-up over
    ``cfg.warmup_steps``, then constant, or cosine / linear decay to ``cfg.min_lr_ratio`` at ``total_steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LambdaLR:
    """Per-optimiser-step schedule of :func:`lr_factor`; ``total_steps`` = optimiser steps of the run."""
    if total_steps < 1:
        raise ValueError(f"build_scheduler: total_steps must be >= 1, got {total_steps}")
    return LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))


def advance_schedule(scheduler: LRScheduler) -> None:
    """``scheduler.step()`` after an optimiser update, applied or skipped (non-finite, loss-scale overflow):
    the schedule counts update attempts. Torch warns when this precedes every ``optimizer.step()`` (the run's
    first update skipped, common at float16's initial loss scale); that order is intended, so the warning is
    silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`",
                                UserWarning)
        scheduler.step()


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Global L2 gradient norm over all ranks (DTensor-aware), clipped to ``max_norm`` when > 0.

    Returns a float32 scalar on the parameters' device; non-finite when any gradient is.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros((), dtype=torch.float32)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=None)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm.float()
