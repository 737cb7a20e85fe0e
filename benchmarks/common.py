"""Shared helpers for the benchmark scripts in ``benchmarks/`` (run as ``python benchmarks/bench_<op>.py``).

API:

* ``device_info(device) -> dict``: device name, CPU/GPU model, thread count, torch/triton/CUDA versions,
  1-minute load average (CPU timings are only as good as the machine was idle).
* ``timeit_median(fn, warmup=3, repeats=20, device=None) -> dict``: runs ``fn()`` ``warmup`` times, then
  times ``repeats`` calls; CUDA events on a CUDA device, ``time.perf_counter`` otherwise. Returns
  ``{"median_ms", "min_ms", "max_ms", "repeats"}``.
* ``peak_memory(fn, device) -> int``: peak extra bytes while ``fn()`` runs: CUDA ``max_memory_allocated``
  above the starting allocation on a GPU; on the CPU the peak process-RSS delta sampled by a background
  thread (coarse; pair it with ``tensor_bytes`` for an exact lower bound).
* ``tensor_bytes(obj) -> int``: bytes held by the tensors in a (nested) tuple/list/dict/dataclass.
* ``hbm_bytes_per_s(device) -> float | None``: the GPU's spec-sheet memory bandwidth (H100 / H200 / A100
  variants by name; None elsewhere), the denominator of ``pct_of_hbm``.
* ``write_results(op, payload, device) -> Path``: writes ``benchmarks/results/<op>-<device>.json`` with
  ``device_info`` merged in, and returns the path.
* ``print_table(rows, title=None)``: prints a list of flat dicts as a rich table (columns from the keys).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch
from rich.console import Console
from rich.table import Table

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _as_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def device_tag(device: torch.device | str | None = None) -> str:
    """Short file-name tag for ``device``: ``cpu`` or the GPU name (e.g. ``nvidia-h100-80gb-hbm3``)."""
    dev = _as_device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev).lower().replace(" ", "-")
    return dev.type


def device_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """Versions and hardware of this run, merged into every results file."""
    dev = _as_device(device)
    info: dict[str, Any] = {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        # Other processes skew CPU timings; the 1-minute load average at write time says how much.
        "load_average_1m": os.getloadavg()[0],
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


_HBM_BYTES_PER_S = (  # spec-sheet bandwidths, most specific name first
    ("h200", 4.8e12), ("h100 nvl", 3.9e12), ("h100 pcie", 2.0e12), ("h100", 3.35e12),
    ("a100-sxm4-80gb", 2.039e12), ("a100 80gb pcie", 1.935e12), ("a100", 1.555e12),
)


def hbm_bytes_per_s(device: torch.device | str | None = None) -> float | None:
    """Spec-sheet memory bandwidth of the CUDA ``device`` (bytes/s), or None for other or unknown devices."""
    dev = _as_device(device)
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev).lower()
    return next((bw for key, bw in _HBM_BYTES_PER_S if key in name), None)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timeit_median(
    fn: Callable[[], object],
    warmup: int = 3,
    repeats: int = 20,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Median/min/max wall time of ``fn()`` in milliseconds over ``repeats`` calls after ``warmup`` calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    dev = _as_device(device)
    for _ in range(warmup):
        fn()
    _sync(dev)
    times: list[float] = []
    if dev.type == "cuda":
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "repeats": repeats,
    }


def peak_memory(fn: Callable[[], object], device: torch.device | str | None = None) -> int:
    """Peak extra bytes allocated while ``fn()`` runs (see the module docstring for the CPU caveat)."""
    dev = _as_device(device)
    if dev.type == "cuda":
        _sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        out = fn()
        _sync(dev)
        del out
        return max(0, torch.cuda.max_memory_allocated(dev) - base)
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(1e-3)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out = fn()
        peak = max(peak, proc.memory_info().rss)
        del out
    finally:
        done.set()
        sampler.join()
    return max(0, peak - base)


def tensor_bytes(obj: object) -> int:
    """Total bytes of the tensors reachable from ``obj`` (tensors, sequences, dicts, dataclasses)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def write_results(op: str, payload: dict[str, Any], device: torch.device | str | None = None) -> Path:
    """Write ``payload`` plus ``device_info`` to ``benchmarks/results/<op>-<device>.json``; return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{op}-{device_tag(device)}.json"
    record = {"op": op, **device_info(device), **payload}
    path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    return path


def print_table(rows: list[dict[str, Any]], title: str | None = None) -> None:
    """Print ``rows`` (flat dicts sharing keys) as a table; floats are shown with 4 significant digits."""
    table = Table(title=title)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in (row.get(c, "") for c in columns)))
    # Wide enough for every column when the output is a pipe or a log file (rich assumes 80 there).
    console = Console() if sys.stdout.isatty() else Console(width=200)
    console.print(table)
