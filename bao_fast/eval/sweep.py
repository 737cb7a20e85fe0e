"""Training sweeps for ``bao-fast pareto --sweep``: one ``bao-fast train`` run per point of a grid of
dotted config overrides, each in its own run directory, run one after the other as subprocesses (each
run owns the whole machine, its vLLM engine and its process group).

    grid = parse_grid(["algo.shaping.info_seeking_coef=0,0.005,0.05", "algo.name=bao,grpo"])
    runs = plan("configs/demo-cpu.yaml", grid, "pareto/runs")   # 6 runs
    for run, run_dir in execute(runs): ...
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bao_fast.cli import RunError, UsageError
from bao_fast.config import load_config


@dataclass(frozen=True)
class SweepRun:
    """One grid point: its label, run directory, overrides and the full training command."""

    label: str
    run_dir: Path
    overrides: tuple[str, ...]
    command: tuple[str, ...]


def parse_grid(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["a.b=1,2", "c=x"]`` -> ``[("a.b", ["1", "2"]), ("c", ["x"])]``; values stay text (the config
    parses them as YAML scalars)."""
    grid: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, sep, raw = spec.partition("=")
        values = [v.strip() for v in raw.split(",")]
        if not sep or not key.strip() or not all(values):
            raise UsageError(f"grid: {spec!r} must look like 'section.key=v1,v2,...'")
        if any(k == key.strip() for k, _ in grid):
            raise UsageError(f"grid: key {key.strip()!r} given twice")
        grid.append((key.strip(), values))
    return grid


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)


def plan(
    base_config: str | Path, grid: Sequence[tuple[str, Sequence[str]]], runs_dir: str | Path, common: Sequence[str] = ()
) -> list[SweepRun]:
    """Every combination of the grid as a run in ``runs_dir/<label>``. Each combination is validated with
    ``load_config`` up front, so a typo fails before hours of training rather than after; ``run_dir`` in the
    grid or in ``common`` is a UsageError (it would silently lose to the per-run directory)."""
    if not grid:
        raise UsageError("grid: a sweep needs at least one KEY=V1,V2 axis (--grid)")
    base = Path(base_config)
    if not base.is_file():
        raise FileNotFoundError(f"base_config: {base} does not exist")
    keys = [k for k, _ in grid]
    for key in (*keys, *(o.partition("=")[0].strip() for o in common)):
        if key == "run_dir":
            raise UsageError(f"run_dir: each sweep run gets its own directory under {str(runs_dir)!r} (set by "
                             "--out); do not set run_dir in --grid or --set")
    runs = []
    for combo in itertools.product(*(values for _, values in grid)):
        pairs = [f"{k}={v}" for k, v in zip(keys, combo)]
        label = ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(keys, combo))
        run_dir = Path(runs_dir) / _slug(label)
        overrides = (*common, *pairs, f"run_dir={run_dir}")
        load_config(base, list(overrides))
        command = (sys.executable, "-m", "bao_fast.cli", "train", "--config", str(base), *overrides)
        runs.append(SweepRun(label, run_dir, overrides, command))
    return runs


def execute(runs: Sequence[SweepRun]) -> Iterator[tuple[SweepRun, Path]]:
    """Run the trainings in order, streaming their output; yields each run with its directory. A failed
    run stops the sweep with a RunError naming it (its own error is in the output above: no traceback)."""
    for i, run in enumerate(runs, 1):
        print(f"[sweep {i}/{len(runs)}] {run.label}: {' '.join(run.command)}", flush=True)
        result = subprocess.run(run.command, check=False)
        if result.returncode != 0:
            raise RunError(f"sweep run {run.label!r} failed with exit code {result.returncode} (its output is above)")
        yield run, run.run_dir
