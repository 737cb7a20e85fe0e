"""torchrun worker for tests/train/test_collectives.py (not collected by pytest).

argv: <out dir>. Each rank runs the host collectives on values that differ by rank (rank r has r + 1 work
items) and writes <out dir>/rank-<r>.json with what they returned.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from bao_fast.train.collectives import gather_objects, lockstep, max_over_ranks, maxima_over_ranks, sum_over_ranks


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {
        "max": max_over_ranks(2**40 + rank),
        "maxima": maxima_over_ranks([0.5 * rank, -float(rank)]),
        "sum": sum_over_ranks([1.0 + rank, 0.25]),
        "gather": gather_objects({"rank": rank}),
        "lockstep": lockstep([f"r{rank}-{i}" for i in range(rank + 1)]),
        "lockstep_filler": lockstep(["x"] if rank else [], filler="f"),
    }
    Path(sys.argv[1], f"rank-{rank}.json").write_text(json.dumps(results))
    dist.barrier()  # no rank tears its group down while the other may still be talking to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
