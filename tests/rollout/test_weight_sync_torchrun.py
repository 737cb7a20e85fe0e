"""FSDP2 (gloo) -> per-rank vLLM weight sync under ``torchrun --nproc_per_node 2`` (see _weight_sync_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("_weight_sync_worker.py")


def test_fsdp2_weight_sync_under_torchrun(tiny_model_dir, tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    proc = subprocess.run(
        [*cmd, str(WORKER), str(tiny_model_dir), str(out)], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = json.loads(out.read_text())["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    for r in ranks:
        assert r["sharded"], "the policy must be FSDP2-sharded (DTensor parameters)"
        assert r["after"] == r["hf_after"], "after the sync vLLM must decode like the perturbed model"
        assert r["after"] != r["before"], "the perturbation must change the greedy outputs"
    assert ranks[0]["after"] == ranks[1]["after"]
