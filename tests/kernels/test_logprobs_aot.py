"""The log-prob kernels compile for Hopper without a GPU (the interpreter accepts code the JIT rejects), and
their main loops become wgmma tensor-core MMAs fed by asynchronous copies, in shared memory that fits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
H100_SHARED_BYTES = 227 * 1024


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton build ships no NVIDIA backend / ptxas")
def test_kernels_compile_for_sm90_with_tensor_cores(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    cmd = [sys.executable, "-m", "bao_fast.kernels.logprobs_aot", "--arch", "90", "--dtype", "bfloat16"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(reports) == {"fwd", "combine", "dlogits", "dw", "dh"}
    for name in ("fwd", "dlogits", "dw", "dh"):
        report = reports[name]
        assert report["wgmma"] > 0, f"{name}: no wgmma in the PTX"
        assert report["cp_async"] > 0, f"{name}: loads are not pipelined"
        assert 0 < report["shared_bytes"] <= H100_SHARED_BYTES, f"{name}: {report['shared_bytes']} B shared"
