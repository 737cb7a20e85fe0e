"""Small host-side collectives that keep ranks in lock-step (FSDP needs every rank to run the same number of
forwards and backwards), over a gloo group whatever the training backend."""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def max_over_ranks(value: int) -> int:
    """The largest ``value`` of all ranks."""
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_cpu_group())
    return int(t.item())


def maxima_over_ranks(values: list[float]) -> list[float]:
    """Element-wise maximum of ``values`` over ranks (float64, on the CPU)."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_cpu_group())
    return t.tolist()


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64, on the CPU)."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=_cpu_group())
    return t.tolist()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_cpu_group())
    return out


_GLOO: Any = None


def _cpu_group() -> Any:
    """A gloo group for small host-side collectives (the default group when it already is gloo)."""
    global _GLOO
    if dist.get_backend() == "gloo":
        return None
    if _GLOO is None:
        _GLOO = dist.new_group(backend="gloo")
    return _GLOO


def lockstep(items: list[T], filler: T | None = None) -> list[tuple[T, float]]:
    """Pad this rank's work items (micro-batches, trajectory ranges) to the largest count over ranks with
    zero-weight repeats of the first (of ``filler`` where this rank has none), so every rank runs the same
    number of FSDP forwards/backwards. Returns ``(item, weight)`` pairs: 1.0 for real work, 0.0 for padding
    (none at all where no rank has an item). ``items`` may be empty only with a ``filler``."""
    if not items and filler is None:
        raise ValueError("lockstep: items is empty; every rank needs at least one trajectory")
    count = max_over_ranks(len(items))
    pad = items[0] if items else filler
    return [(items[i], 1.0) if i < len(items) else (pad, 0.0) for i in range(count)]
