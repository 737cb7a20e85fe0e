"""``bao-fast bench``: run every ``benchmarks/bench_*.py`` and render ``benchmarks/results/*.json`` into
``benchmarks/results/REPORT.md`` (shapes, median times, ratios against each baseline, peak memory,
device and versions).

Each script runs in its own process (a fresh allocator and CUDA context per op, so one script's peak
memory does not leak into the next). On a machine without CUDA, Triton runs in its interpreter
(``TRITON_INTERPRET=1``) and the scripts measure what a CPU can: ratios to the CPU baselines, not GPU
throughput. ``--quick`` is passed to the scripts that declare it (their small sizes); they then write to
``benchmarks/results/quick/`` (gitignored), which the report leaves out: it renders full-size results only.
A script run without arguments leaves out the baselines not installed here (vLLM on the GPU machines),
recording them as skipped.

    bao-fast bench                          # everything, then the report
    bao-fast bench --only logprobs trainer  # scripts whose name contains one of the words
    bao-fast bench --report-only            # re-render the committed results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bao_fast
from bao_fast.cli import UsageError

REPORT_NAME = "REPORT.md"


def default_bench_dir() -> Path:
    """``./benchmarks`` when run from a checkout root, else the one beside the (editable) package."""
    here = Path.cwd() / "benchmarks"
    if here.is_dir():
        return here
    return Path(bao_fast.__file__).resolve().parents[1] / "benchmarks"


def discover(bench_dir: Path, only: Sequence[str] = ()) -> list[Path]:
    """The ``bench_*.py`` scripts of ``bench_dir`` in name order, filtered by ``only`` substrings."""
    if not bench_dir.is_dir():
        raise FileNotFoundError(f"--bench-dir: {bench_dir} is not a directory")
    scripts = sorted(bench_dir.glob("bench_*.py"))
    if only:
        scripts = [s for s in scripts if any(word in s.stem for word in only)]
        if not scripts:
            raise UsageError(f"--only: no benchmarks/bench_*.py matches {list(only)}")
    return scripts


@dataclass(frozen=True)
class ScriptRun:
    """Outcome of one benchmark script."""

    script: Path
    returncode: int
    seconds: float


def supports_quick(script: Path) -> bool:
    """Whether the script declares a ``--quick`` option (its small CPU sizes)."""
    return '"--quick"' in script.read_text()


def run_script(script: Path, quick: bool, timeout: float | None) -> ScriptRun:
    """Run one script with this interpreter, with ``--quick`` when asked for and the script declares it;
    its output streams through. A timeout counts as a failure."""
    env = dict(os.environ)
    if not _cuda_available():
        env.setdefault("TRITON_INTERPRET", "1")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = [sys.executable, str(script), *(["--quick"] if quick and supports_quick(script) else [])]
    print(f"\n=== {script.name}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    try:
        code = subprocess.run(command, env=env, cwd=script.parent.parent, timeout=timeout, check=False).returncode
    except subprocess.TimeoutExpired:
        print(f"=== {script.name}: timed out after {timeout:.0f} s", file=sys.stderr)
        code = -1
    return ScriptRun(script, code, time.perf_counter() - start)


def _cuda_available() -> bool:
    import torch  # here, so that rendering a report (--report-only) does not need torch

    return torch.cuda.is_available()


def load_results(results_dir: Path) -> list[dict[str, Any]]:
    """Every ``<op>-<device>.json`` record of ``results_dir``, in file-name order, not those of its folders
    (``quick/``: smoke runs); the file name is kept under ``"_file"``. A file that is not a JSON object raises
    UsageError naming it."""
    records = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(record, dict):
            raise UsageError(f"{path}: a results file must hold one JSON object")
        records.append({"_file": path.name, **record})
    return records


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--only", nargs="+", default=[], metavar="WORD", help="run scripts whose name contains WORD")
    parser.add_argument("--quick", action="store_true", help="small sizes (passed to the scripts that declare --quick)")
    parser.add_argument("--report-only", action="store_true", help="do not run anything; render the report")
    parser.add_argument("--timeout", type=float, default=None, metavar="S", help="per-script time limit")
    parser.add_argument("--bench-dir", type=Path, default=None, help="directory of bench_*.py (default: ./benchmarks)")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"report path (default: <bench-dir>/results/{REPORT_NAME})"
    )


def run(args: argparse.Namespace) -> int:
    from bao_fast.eval.report import benchmark_report

    bench_dir = (args.bench_dir or default_bench_dir()).resolve()
    if args.report_only and (args.only or args.quick or args.timeout is not None):
        raise UsageError("--report-only runs nothing: drop --only / --quick / --timeout")
    if not bench_dir.is_dir():
        raise FileNotFoundError(f"--bench-dir: {bench_dir} is not a directory")
    failed: list[ScriptRun] = []
    if not args.report_only:
        runs = [run_script(s, args.quick, args.timeout) for s in discover(bench_dir, args.only)]
        failed = [r for r in runs if r.returncode != 0]
        for r in runs:
            status = "ok" if r.returncode == 0 else f"FAILED ({r.returncode})"
            print(f"{r.script.name:<36} {r.seconds:8.1f} s  {status}")
    results_dir = bench_dir / "results"
    records = load_results(results_dir) if results_dir.is_dir() else []
    if not records:
        print(f"bao-fast bench: no results in {results_dir}", file=sys.stderr)
        return 1
    out = args.out or results_dir / REPORT_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        report = benchmark_report(records)
    except ValueError as exc:  # a results file without the fields the report needs (named in the message)
        raise UsageError(str(exc)) from exc
    out.write_text(report)
    print(f"report: {out} ({len(records)} result files)")
    if failed:
        print(
            f"bao-fast bench: {len(failed)} script(s) failed: {', '.join(r.script.name for r in failed)}",
            file=sys.stderr,
        )
        return 1
    return 0
