"""torchrun worker for tests/train/test_load_policy.py (not collected by pytest).

argv: <model dir> <out dir>. Loads the policy with ``load_policy`` while counting checkpoint reads, then
compares every parameter (gathered) and buffer with the checkpoint read directly, and writes
<out dir>/rank-<r>.json: {"reads": n, "mismatches": [names]}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from bao_fast.config import ModelConfig
from bao_fast.train.fsdp import init_distributed, load_policy


def main() -> None:
    model_dir, out_dir = sys.argv[1], Path(sys.argv[2])
    reads: list[str] = []
    read = AutoModelForCausalLM.from_pretrained

    def counted(*args, **kwargs):
        reads.append(str(args[0]))
        return read(*args, **kwargs)

    AutoModelForCausalLM.from_pretrained = counted
    env = init_distributed()
    policy = load_policy(model_dir, ModelConfig(path=model_dir), env)
    AutoModelForCausalLM.from_pretrained = read
    expected = read(model_dir, dtype=torch.float32)
    want = {f"hf.{k}": v for k, v in [*expected.named_parameters(), *expected.named_buffers()]}
    got = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in policy.named_parameters()}
    got.update(dict(policy.named_buffers()))
    mismatches = sorted(k for k in want.keys() | got.keys()
                        if k not in want or k not in got or not torch.equal(got[k].detach().cpu(), want[k]))
    (out_dir / f"rank-{env.rank}.json").write_text(json.dumps({"reads": len(reads), "mismatches": mismatches}))
    dist.barrier()  # no rank tears its group down while the other may still be talking to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
