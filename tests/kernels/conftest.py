"""Shared fixture of the ahead-of-time compile tests: run a ``bao_fast.kernels.*_aot`` module in a fresh
process (the JIT needs ``TRITON_INTERPRET`` unset) and return the JSON report it prints last."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import triton

NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

RunAot = Callable[..., dict[str, Any]]


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
