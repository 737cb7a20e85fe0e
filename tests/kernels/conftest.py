"""Shared fixtures of the kernel tests: ``poisoned_outputs`` (launcher buffers never start as zeros) and
``run_aot`` (run a ``bao_fast.kernels.*_aot`` module in a fresh process, since the JIT needs
``TRITON_INTERPRET`` unset, and return the JSON report it prints last) and ``check_launch_reports`` (the
checks shared by the advantage and loss AOT tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import triton
from bao_fast.kernels.aot import KernelReport

NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

RunAot = Callable[..., dict[str, Any]]


@pytest.fixture
def poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every buffer allocated with ``torch.empty`` / ``torch.empty_like`` starts as NaN (floats) or 2**30
    (ints), never zeros, so an element a kernel forgets to write fails the comparison."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan") if t.is_floating_point() else 2**30)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


@pytest.fixture
def run_aot(tmp_path: Path) -> RunAot:
    """``run_aot(module, *args, tools=("ptxas",))`` -> the module's report; skips when Triton ships no
    NVIDIA backend tools."""

    def run(module: str, *args: str, tools: tuple[str, ...] = ("ptxas",)) -> dict[str, Any]:
        missing = [tool for tool in tools if not (NVIDIA_BIN / tool).exists()]
        if missing:
            pytest.skip(f"this Triton build ships no NVIDIA backend tools {missing}")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = str(tmp_path)
        env["TRITON_DEFAULT_FP_FUSION"] = "1"
        cmd = [sys.executable, "-m", f"bao_fast.kernels.{module}", *args]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return run


@pytest.fixture
def check_launch_reports() -> Callable[[dict[str, Any], set[str]], None]:
    """``check(reports, expected)``: every ``expected`` compilation (``sm<arch>/...`` names) is reported, some
    launch is specialised on unit ints (``ints=one``), and every kernel uses registers and has no problem
    (spills, shared memory) for its arch."""

    def check(reports: dict[str, Any], expected: set[str]) -> None:
        assert expected <= set(reports), sorted(expected - set(reports))
        assert any(name.endswith("ints=one") for name in reports)
        for name, fields in reports.items():
            report = KernelReport(**fields)
            assert report.registers > 0, name
            assert report.problems(int(name[2:4])) == [], name

    return check
