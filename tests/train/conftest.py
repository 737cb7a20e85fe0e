"""Helpers for the trainer tests: run a worker script as a plain process or under torchrun; an in-process
world of one."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch.distributed as dist

HERE = Path(__file__).resolve().parent


def worker_command(
    script: str, args: list[str], nproc: int = 1, torchrun_args: tuple[str, ...] = ()
) -> tuple[list[str], dict[str, str]]:
    """Command line and environment that run ``tests/train/<script>`` with ``args`` (under ``torchrun
    --standalone *torchrun_args`` when ``nproc > 1``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *torchrun_args]
    else:
        cmd = [sys.executable]
    return [*cmd, str(HERE / script), *args], env


def worker_process(script: str, args: list[str], nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run :func:`worker_command`; its exit status and output (text)."""
    cmd, env = worker_command(script, args, nproc)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def run_worker(script: str, args: list[str], nproc: int = 1, timeout: float = 300) -> None:
    """:func:`worker_process`, failing the test with the tail of the output when the worker exits non-zero."""
    proc = worker_process(script, args, nproc, timeout)
    if proc.returncode != 0:
        pytest.fail(f"{script} (nproc={nproc}) exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")


@pytest.fixture(scope="module")
def single_rank_world() -> Iterator[None]:
    """An in-process gloo world of one for code that runs collectives, unless the process already has one."""
    created = not dist.is_initialized()
    if created:
        store = Path(tempfile.mkdtemp()) / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    if created:
        dist.destroy_process_group()
