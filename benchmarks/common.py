"""Shared helpers for the benchmark scripts in ``benchmarks/`` (run as ``python benchmarks/bench_<op>.py``).

API:

* ``device_info(device) -> dict``: device, its name (the GPU's, or the CPU model), thread count,
  torch/triton/CUDA versions, the baselines' liger-kernel / cut-cross-entropy versions (None when not
  installed), 1-minute load average (CPU timings are only as good as the machine was idle).
* ``package_version(dist) -> str | None``: the installed version of a distribution, None when absent.
* ``timeit_median(fn, warmup=3, repeats=20, device=None) -> dict``: runs ``fn()`` ``warmup`` times, then
  times ``repeats`` calls; CUDA events on a CUDA device, ``time.perf_counter`` otherwise. Returns
  ``{"median_ms", "min_ms", "max_ms", "repeats"}``.
* ``peak_memory(fn, device) -> int``: peak extra tensor bytes while ``fn()`` runs (its result included):
  CUDA ``max_memory_allocated`` above the starting allocation on a GPU; on the CPU the peak of the CPU
  allocator's running total in the profiler's allocation events (``cpu_tensor_peak``). Process RSS is not
  used: glibc reuses and keeps freed heap memory, so RSS deltas miss most tensor traffic.
* ``cpu_tensor_peak(fn) -> int``: that CPU measurement. Counts tensor storage allocated through torch's CPU
  allocator on the calling thread (and autograd's, which is the same on the CPU); not Python objects,
  NumPy arrays or allocations inside a C++ op that bypass the allocator.
* ``tensor_bytes(obj) -> int``: bytes held by the tensors in a (nested) tuple/list/dict/dataclass.
* ``hbm_bytes_per_s(device) -> float | None``: the GPU's spec-sheet memory bandwidth (H100 / H200 / A100
  variants by name; None elsewhere), the denominator of ``pct_of_hbm``.
* ``write_results(op, payload, device, quick=False) -> Path``: writes ``benchmarks/results/<op>-<device>.json``
  with ``device_info`` and the write time merged in, and returns the path. ``quick`` (a script's ``--quick``
  smoke run) writes to ``benchmarks/results/quick/`` instead (gitignored, left out of the report), so a smoke
  run never overwrites the committed full-size results.
* ``print_table(rows, title=None)``: prints a list of flat dicts as a rich table (columns from the keys).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch._C._profiler import _EventType

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUICK_SUBDIR = "quick"  # results of --quick smoke runs, under RESULTS_DIR
# Baselines whose versions every results file records (distribution names, as pip spells them).
BASELINE_PACKAGES = ("liger-kernel", "cut-cross-entropy")

# Kineto (torch.profiler) prints a USDT line on stderr at every profiler start and stop, and cpu_tensor_peak
# profiles each measurement. Only level 6 (above all of its levels) hides them, its own errors with them; an
# exported KINETO_LOG_LEVEL wins.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")


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


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux; ``platform.processor()`` is empty there)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def package_version(dist: str) -> str | None:
    """The installed version of distribution ``dist`` (e.g. ``liger-kernel``), None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """Versions and hardware of this run, merged into every results file."""
    dev = _as_device(device)
    info: dict[str, Any] = {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model(),
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
    info.update({dist.replace("-", "_"): package_version(dist) for dist in BASELINE_PACKAGES})
    return info


_HBM_BYTES_PER_S: tuple[tuple[str, float | None], ...] = (  # spec-sheet bandwidths, most specific name first
    ("gh200", None),  # 4.0 or 4.9 TB/s by memory variant: unknown from the name, and it contains "h200"
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
    """Peak extra tensor bytes while ``fn()`` runs, its result included (see the module docstring)."""
    dev = _as_device(device)
    if dev.type != "cuda":
        return cpu_tensor_peak(fn)
    _sync(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    out = fn()
    _sync(dev)
    del out
    return max(0, torch.cuda.max_memory_allocated(dev) - base)


def cpu_tensor_peak(fn: Callable[[], object]) -> int:
    """Peak extra bytes of CPU tensor storage while ``fn()`` runs, its result included: every allocation event
    of a memory-profiling run carries the CPU allocator's running total after it, so the peak is the largest
    total less the total before the first event (frees of tensors older than the run are not reported)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append((event.start_time_ns, event.extra_fields))
    if not events:
        return 0
    first = min(events, key=lambda e: e[0])[1]
    base = first.total_allocated - first.alloc_size
    return max(0, max(fields.total_allocated for _, fields in events) - base)


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


def write_results(
    op: str, payload: dict[str, Any], device: torch.device | str | None = None, quick: bool = False
) -> Path:
    """Write ``payload`` plus ``device_info`` and the UTC write time to ``benchmarks/results/<op>-<device>.json``
    (``quick``: to ``benchmarks/results/quick/``, never over the full-size results); return the path."""
    out_dir = RESULTS_DIR / QUICK_SUBDIR if quick else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{op}-{device_tag(device)}.json"
    written = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    record = {"op": op, **device_info(device), "written_utc": written, **payload}
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
