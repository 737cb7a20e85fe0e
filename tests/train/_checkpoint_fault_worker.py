"""torchrun worker (2 ranks) for tests/train/test_checkpoint_safety.py (not collected by pytest).

argv: <init model dir> <out dir>. Faults that hit one rank only must fail every rank with the same clear
error, never leave the other rank waiting in a barrier, and never touch the previous checkpoint:
a full disk on rank 1 while it writes its state file; a damaged rank-1 state file on load; a checkpoint
saved by a world of one. Each rank writes what it saw to <out dir>/faults-<rank>.json.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from bao_fast.config import ModelConfig, OptimConfig
from bao_fast.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from bao_fast.train.fsdp import init_distributed, load_policy
from bao_fast.train.optim import build_optimizer


def outcome(fn) -> str:
    try:
        fn()
    except CheckpointError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def main() -> None:
    init_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    env = init_distributed()
    policy = load_policy(init_dir, ModelConfig(path=str(init_dir)), env)
    optimizer = build_optimizer(policy, OptimConfig(lr=1e-2))
    root = out / "ck"
    save_checkpoint(root, 1, policy, optimizer, {"step": 1})
    result: dict[str, object] = {}

    real_save = torch.save

    def full_disk_on_rank_1(obj, f, *args, **kwargs):
        if env.rank == 1 and str(getattr(f, "name", "")).endswith("rank-1.pt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    torch.save = full_disk_on_rank_1
    result["disk_full"] = outcome(lambda: save_checkpoint(root, 2, policy, optimizer, {"step": 2}))
    torch.save = real_save
    dist.barrier()
    result["dirs"] = sorted(p.name for p in root.iterdir())
    result["latest"] = str(latest_checkpoint(root))

    damaged, single = out / "damaged" / "step-000001", out / "single" / "step-000001"
    if env.is_main:
        shutil.copytree(root / "step-000001", damaged)
        (damaged / "rank-1.pt").write_bytes(b"garbage")
        shutil.copytree(root / "step-000001", single)
        (single / "rank-1.pt").unlink()  # as if saved by a world of one
    dist.barrier()
    result["damaged"] = outcome(lambda: load_checkpoint(damaged, policy, optimizer))
    result["single"] = outcome(lambda: load_checkpoint(single, policy, optimizer))
    result["good"] = outcome(lambda: load_checkpoint(root / "step-000001", policy, optimizer))
    (out / f"faults-{env.rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
