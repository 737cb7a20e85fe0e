"""The shaped-advantage kernels compile for Ampere and Hopper without a GPU (the interpreter accepts code the
JIT rejects), for every configuration the launcher can meet, within shared memory and without spills."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton
from bao_fast.kernels.aot import KernelReport

from bao_fast.algo.shaping import TRAJECTORY_SCORES, TURN_CREDITS

NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
NO_TOOLS = "this Triton build ships no NVIDIA backend / ptxas / cuobjdump"


@pytest.mark.skipif(not all((NVIDIA_BIN / tool).exists() for tool in ("ptxas", "cuobjdump")), reason=NO_TOOLS)
def test_every_launch_compiles_for_sm80_and_sm90(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    cmd = [sys.executable, "-m", "bao_fast.kernels.advantages_aot", "--arch", "80", "90", "--workers", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = json.loads(proc.stdout.strip().splitlines()[-1])

    expected = set()
    for arch, dtype in itertools.product((80, 90), ("float32", "float64")):
        prefix = f"sm{arch}/{dtype}/"
        expected |= {prefix + "turn_token_count:ints=any", prefix + "token_gather:ints=any"}
        expected |= {f"{prefix}group_normalize:norm_by_std={norm},ints=any" for norm in (False, True)}
        expected |= {
            f"{prefix}trajectory_shaping:credit={credit},score={score},ints=any"
            for credit, score in itertools.product(TURN_CREDITS, TRAJECTORY_SCORES)
        }
    assert expected <= set(reports), sorted(expected - set(reports))
    assert any(name.endswith("ints=one") for name in reports)
    for name, fields in reports.items():
        report = KernelReport(**fields)
        assert report.registers > 0, name
        assert report.problems(int(name[2:4])) == [], name
