"""Benchmark of pack_multiturn: C++ CPU op (all threads and one thread) and the CUDA op when a GPU is
present, against the pure-Python reference, on B trajectories of a system prompt + N (user, assistant)
turns. PERF.md target: C++ >= 30x the reference at 1024 x 16; CUDA path without host sync.

    python benchmarks/bench_packing.py [--trajectories 1024] [--turns 16] [--repeats 20] [--quick]

Both sides allocate their outputs fresh on every call (~190 MB at 1024 x 16). With glibc's default dynamic mmap
threshold such buffers are sometimes mapped anew and page-faulted on first touch, sometimes reused from the heap,
which swings the C++ op's median by up to 5x between runs (7.6 to 42 ms measured on one quiet 2-core machine).
So the script re-executes itself with ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` raised (freed
buffers are reused: the steady state of a training loop, and what jemalloc / tcmalloc give); the setting is
recorded in the JSON. ``--default-allocator`` measures with glibc's defaults instead.

``peak_extra_MB`` is the peak of tensor allocations (``common.peak_memory``): the Python reference's lists
and the C++ op's host-side vectors are not in it.

Writes benchmarks/results/pack_multiturn-<device>.json (``--quick``: benchmarks/results/quick/, never over the
full-size results) and prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch
from common import peak_memory, print_table, tensor_bytes, timeit_median, write_results

from bao_fast.data.packed import DEVICE_FIELDS
from bao_fast.ops import pack_multiturn
from bao_fast.ops.reference import pack_multiturn_reference

STEADY_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 32)}


def make_batch(
    trajectories: int, turns: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host description + token ids: system prompt (64..512 tokens), then ``turns`` x (user / observation
    16..256, assistant 16..384)."""
    gen = torch.Generator().manual_seed(seed)
    per_seq = 1 + 2 * turns
    system = torch.randint(64, 513, (trajectories, 1), generator=gen)
    user = torch.randint(16, 257, (trajectories, turns), generator=gen)
    assistant = torch.randint(16, 385, (trajectories, turns), generator=gen)
    seg_lens = torch.cat([system, torch.stack([user, assistant], dim=2).flatten(1)], dim=1).flatten()
    seg_trained = (torch.arange(per_seq) % 2 == 0) & (torch.arange(per_seq) > 0)
    seq_seg_offsets = torch.arange(trajectories + 1, dtype=torch.int32) * per_seq
    input_ids = torch.randint(0, 151_936, (int(seg_lens.sum()),), generator=gen)
    return seg_lens.to(torch.int32), seg_trained.repeat(trajectories), seq_seg_offsets, input_ids


def with_threads(num_threads: int, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        previous = torch.get_num_threads()
        torch.set_num_threads(num_threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(previous)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trajectories", type=int, default=1024)
    parser.add_argument("--turns", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="256 trajectories, results to results/quick/")
    parser.add_argument("--default-allocator", action="store_true", help="keep glibc's malloc defaults")
    args = parser.parse_args()
    if not args.default_allocator and any(os.environ.get(k) != v for k, v in STEADY_ALLOCATOR.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **STEADY_ALLOCATOR})
    if args.quick:
        args.trajectories = min(args.trajectories, 256)

    seg_lens, seg_trained, seq_seg_offsets, input_ids = make_batch(args.trajectories, args.turns, args.seed)
    host = (seg_lens, seg_trained, seq_seg_offsets)
    num_tokens = input_ids.numel()

    # Same answer first: every output field of the C++ op against the reference.
    expected = pack_multiturn_reference(*host, input_ids)
    packed = pack_multiturn(*host, input_ids)
    for name in DEVICE_FIELDS[1:]:
        if not torch.equal(getattr(packed, name), expected[name]):
            raise RuntimeError(f"C++ pack_multiturn differs from the reference in {name}")
    output_bytes = tensor_bytes([getattr(packed, name) for name in DEVICE_FIELDS[1:]])
    num_turns, num_rows = packed.num_turns, packed.target_rows.numel()

    cases: dict[str, tuple[Callable[[], object], torch.device]] = {
        "python reference": (lambda: pack_multiturn_reference(*host, input_ids), torch.device("cpu")),
        f"C++ ({torch.get_num_threads()} threads)": (lambda: pack_multiturn(*host, input_ids), torch.device("cpu")),
        "C++ (1 thread)": (with_threads(1, lambda: pack_multiturn(*host, input_ids)), torch.device("cpu")),
        # The registered op alone: no validation, sizes precomputed (what the public function adds is host work).
        f"C++ raw op ({torch.get_num_threads()} threads)": (
            lambda: torch.ops.bao_fast.pack_multiturn(*host, input_ids, num_turns, num_rows, -100),
            torch.device("cpu"),
        ),
    }
    results_device = torch.device("cpu")
    if torch.cuda.is_available():
        results_device = torch.device("cuda")
        ids_gpu = input_ids.cuda()
        cuda_batch = pack_multiturn(*host, ids_gpu)
        for name in DEVICE_FIELDS[1:]:
            if not torch.equal(getattr(cuda_batch, name).cpu(), expected[name]):
                raise RuntimeError(f"CUDA pack_multiturn differs from the reference in {name}")
        cases["CUDA (host description in)"] = (lambda: pack_multiturn(*host, ids_gpu), results_device)

    rows = []
    ref_ms = None
    for name, (fn, device) in cases.items():
        timing = timeit_median(fn, warmup=args.warmup, repeats=args.repeats, device=device)
        ref_ms = ref_ms or timing["median_ms"]
        rows.append(
            {
                "impl": name,
                "device": str(device),
                "median_ms": timing["median_ms"],
                "min_ms": timing["min_ms"],
                "Mtokens_per_s": num_tokens / timing["median_ms"] / 1e3,
                "speedup_vs_reference": ref_ms / timing["median_ms"],
                "peak_extra_MB": peak_memory(fn, device) / 2**20,
            }
        )
    print_table(rows, title=f"pack_multiturn: {args.trajectories} trajectories x {args.turns} turns, T={num_tokens}")
    path = write_results(
        "pack_multiturn",
        {
            "shape": {
                "trajectories": args.trajectories,
                "turns": args.turns,
                "segments": seg_lens.numel(),
                "tokens": num_tokens,
                "target_rows": packed.target_rows.numel(),
            },
            "dtype": "int64 token ids",
            "quick": args.quick,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "output_MB": output_bytes / 2**20,
            "allocator": "glibc defaults" if args.default_allocator else STEADY_ALLOCATOR,
            "rows": rows,
        },
        results_device,
        quick=args.quick,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
