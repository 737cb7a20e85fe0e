"""Tune the log-prob kernels' tiles on the GPU this runs on and write a tuning file ``select_tiles`` loads.

Coordinate descent from the tiles in use (a tuned file or the defaults): the forward tile, then the forward's
vocab-split divisor, then each backward kernel's tile (``dlogits``, ``dw``, ``dh``) with the others fixed, its
tile-group size, and last the backward's chunk size (bounded by ``--max-workspace-mb``). Each candidate is
timed on the real launcher at the given shape and must reproduce the starting tiles' outputs (a candidate
that compiles to something wrong is rejected, not picked). Candidates that do not fit the GPU (shared memory,
registers) are recorded with their error and skipped.

    python -m bao_fast.kernels.logprobs_tune                         # PERF.md shape, bf16, this GPU
    python -m bao_fast.kernels.logprobs_tune --n 8192 --v 128256 --out-dir ~/.cache/bao_fast/tuned

The file goes to ``bao_fast/kernels/tuned/`` (commit it) or ``--out-dir`` (then point ``BAO_FAST_TUNED_DIR``
at that directory). It is rewritten after every knob (``"complete": false`` until the last), so a run stopped
by a time limit still leaves the best tiles found so far. Under ``TRITON_INTERPRET=1`` it runs on the CPU
with interpreter-sized candidates: that is how its tests exercise it, not a way to tune.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import triton
from bao_fast.kernels.logprobs import logprobs_backward, logprobs_forward
from bao_fast.kernels.logprobs_configs import (
    DTYPE_NAMES,
    KERNEL_TILES,
    TUNED_DIR,
    LogprobTiles,
    Tile,
    interpreting,
    select_tiles,
    tuned_file_name,
)

KERNELS = KERNEL_TILES
BACKWARD_KERNELS = tuple(k for k in KERNELS if k != "fwd")
_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}

# (block_m, block_n, block_k, num_warps, num_stages); group_m is tuned separately.
_TILES_16BIT = (
    (128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 32, 8, 5),
    (128, 128, 128, 8, 2), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (64, 256, 64, 4, 4),
    (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 5),
)  # fmt: skip
_TILES_FP32 = (
    (64, 128, 32, 8, 4), (64, 64, 32, 8, 3), (64, 128, 16, 8, 3), (128, 64, 32, 8, 3), (32, 128, 32, 4, 3),
    (64, 64, 32, 4, 3),
)  # fmt: skip
_TILES_INTERPRETER = ((16, 32, 16, 4, 2), (32, 32, 16, 4, 2), (16, 16, 32, 4, 2))
_GROUPS = (4, 8, 16)
_SPLIT_DIVISORS = (2, 4, 8, 16)
_CHUNK_MIB = (64, 128, 256, 512)


def candidate_tiles(dtype: torch.dtype) -> list[Tile]:
    """Tiles tried for every kernel: interpreter-sized under ``TRITON_INTERPRET=1``, else by dtype class."""
    table = _TILES_FP32 if dtype == torch.float32 else _TILES_16BIT
    if interpreting():
        table = _TILES_INTERPRETER
    return [Tile(m, n, k, num_warps=w, num_stages=s) for m, n, k, w, s in table]


def candidate_chunk_bytes() -> list[int]:
    """Backward chunk sizes tried: 64 MiB to 512 MiB (64 KiB and 1 MiB under ``TRITON_INTERPRET=1``)."""
    return [1 << 16, 1 << 20] if interpreting() else [mib << 20 for mib in _CHUNK_MIB]


@dataclass(frozen=True)
class Trial:
    """One timed candidate: which knob, its value, median ms (None when it failed) and why it failed."""

    knob: str
    value: str
    median_ms: float | None
    error: str = ""


@dataclass(frozen=True)
class Problem:
    """Inputs of the tuned launches: hidden ``[N, H]``, weight ``[V, H]``, targets ``[N]``, upstream grads."""

    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    grad_logp: torch.Tensor
    grad_entropy: torch.Tensor

    @classmethod
    def random(cls, n: int, h: int, v: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Problem:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        hidden = torch.randn(n, h, generator=gen).to(device, dtype)
        weight = (torch.randn(v, h, generator=gen) / h**0.5).to(device, dtype)
        targets = torch.randint(0, v, (n,), generator=gen).to(device)
        grads = torch.randn(2, n, generator=gen).to(device)
        return cls(hidden, weight, targets, grads[0], grads[1])

    def forward(self, tiles: LogprobTiles) -> tuple[torch.Tensor, ...]:
        """(logp, entropy, lse) with every row, entropy on, temperature 1."""
        return logprobs_forward(
            self.hidden, self.weight, None, self.targets, None,
            temperature=1.0, ignore_index=-100, with_entropy=True, tiles=tiles,
        )  # fmt: skip

    def backward(self, tiles: LogprobTiles, entropy: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(dhidden, dweight) for upstream grads of logp and entropy."""
        dh, dw, _ = logprobs_backward(
            self.grad_logp, self.grad_entropy, self.hidden, self.weight, None, self.targets, None, lse, entropy,
            temperature=1.0, ignore_index=-100, tiles=tiles,
        )  # fmt: skip
        return dh, dw


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn()`` in ms over ``repeats`` calls. No warm-up of its own: ``tune`` has already
    run ``fn`` once (compiling it) to check its outputs."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _close(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], tol: float) -> str:
    """Empty when each output matches within ``tol`` relative to the expected magnitude, else what differs."""
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        err = (a.float() - e.float()).abs().max().item()
        scale = max(1.0, e.float().abs().max().item())
        if not err <= tol * scale:  # also catches NaN
            return f"output {i} differs from the starting tiles' by {err:.3g} (> {tol * scale:.3g})"
    return ""


def tune(
    problem: Problem,
    start: LogprobTiles,
    *,
    repeats: int = 5,
    kernels: Sequence[str] = KERNELS,
    max_workspace_bytes: int | None = None,
    log: Callable[[str], None] = lambda line: None,
    on_knob: Callable[[LogprobTiles, list[Trial]], None] = lambda best, trials: None,
) -> tuple[LogprobTiles, list[Trial]]:
    """Coordinate descent over ``kernels``' tiles (and the split, group and chunk knobs) from ``start``.

    Returns the fastest tiles found and every trial. The forward is timed alone; backward knobs are timed on
    the backward alone, with the forward's outputs of ``start``. ``on_knob(best, trials)`` runs after each
    knob's descent (the best tiles so far).
    """
    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown:
        raise ValueError(f"kernels must be a subset of {KERNELS}, got unknown {unknown}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = problem.hidden.device
    tol = 1e-4 if problem.hidden.dtype == torch.float32 else 2e-2
    ref_fwd = problem.forward(start)
    _, entropy, lse = ref_fwd
    ref_bwd = problem.backward(start, entropy, lse)
    trials: list[Trial] = []

    def measure(knob: str, value: str, tiles: LogprobTiles, backward: bool) -> float | None:
        if backward:
            run: Callable[[], tuple[torch.Tensor, ...]] = lambda: problem.backward(tiles, entropy, lse)  # noqa: E731
            expected = ref_bwd
        else:
            run, expected = (lambda: problem.forward(tiles)), ref_fwd
        try:
            mismatch = _close(run(), expected, tol)
            ms = None if mismatch else time_ms(run, device, repeats)
        except (triton.errors.TritonError, RuntimeError) as err:  # compile/ptxas/resource failures, launch errors
            ms, mismatch = None, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        trials.append(Trial(knob, value, ms, mismatch))
        log(f"{knob:<18} {value:<26} " + (f"{ms:9.3f} ms" if ms is not None else f"skipped: {mismatch}"))
        return ms

    def descend(best: LogprobTiles, knob: str, options: list[tuple[str, LogprobTiles]], backward: bool):
        best_ms = measure(knob, "start", best, backward)
        for label, tiles in options:
            ms = measure(knob, label, tiles, backward)
            if ms is not None and (best_ms is None or ms < best_ms):
                best, best_ms = tiles, ms
        on_knob(best, trials)
        return best

    best = start
    tiles = candidate_tiles(problem.hidden.dtype)
    for kernel in kernels:
        backward = kernel != "fwd"
        current: Tile = getattr(best, kernel)
        grouped = [replace(t, group_m=current.group_m) for t in tiles]
        options = [(t.label(), replace(best, **{kernel: t})) for t in grouped]
        best = descend(best, f"{kernel}.tile", options, backward)
        if kernel == "fwd":
            options = [(str(d), replace(best, fwd_split_divisor=d)) for d in _SPLIT_DIVISORS]
            best = descend(best, "fwd.split_divisor", options, backward=False)
        else:
            current = getattr(best, kernel)
            options = [(str(g), replace(best, **{kernel: replace(current, group_m=g)})) for g in _GROUPS]
            best = descend(best, f"{kernel}.group_m", options, backward=True)
    if any(k in BACKWARD_KERNELS for k in kernels):
        chunks = candidate_chunk_bytes()
        if max_workspace_bytes is not None:
            chunks = [c for c in chunks if c <= max_workspace_bytes]
        options = [(f"{c >> 10} KiB", replace(best, chunk_bytes=c)) for c in chunks]
        best = descend(best, "chunk_bytes", options, backward=True)
    return best, trials


def tuning_record(
    problem: Problem, start: LogprobTiles, best: LogprobTiles, trials: list[Trial], complete: bool = True
) -> dict[str, Any]:
    """The JSON a tuning file holds: ``tiles`` (what ``load_tiles`` reads) plus where and how they were found
    (``complete``: false while the descent has knobs left)."""
    device = problem.hidden.device
    n, h = problem.hidden.shape
    return {
        "op": "token_logprobs",
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "triton-interpreter",
        "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "dtype": DTYPE_NAMES[problem.hidden.dtype],
        "shape": {"n": n, "h": h, "v": problem.weight.shape[0]},
        "versions": {"torch": torch.__version__, "triton": triton.__version__},
        "tiles": best.to_dict(),
        "complete": complete,
        "start_tiles": start.to_dict(),
        "trials": [dataclasses.asdict(t) for t in trials],
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384, help="rows (tokens)")
    parser.add_argument("--h", type=int, default=4096, help="hidden size")
    parser.add_argument("--v", type=int, default=151936, help="vocab size")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-workspace-mb", type=float, default=None, help="cap on the backward's chunk buffer")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out-dir", type=Path, default=TUNED_DIR, help="where the tuning file is written")
    parser.add_argument("--out", type=Path, default=None, help="exact output file (required off CUDA)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if device.type != "cuda" and not interpreting():
        parser.error(f"--device {device}: the kernels run off CUDA only under TRITON_INTERPRET=1")
    if device.type != "cuda" and args.out is None:
        parser.error("--out is required off CUDA (the file name carries the GPU's compute capability)")
    dtype = _DTYPES[args.dtype]
    out = args.out or args.out_dir / tuned_file_name(torch.cuda.get_device_capability(device), dtype)
    problem = Problem.random(args.n, args.h, args.v, dtype, device)
    start = select_tiles(device, dtype)
    budget = int(args.max_workspace_mb * 2**20) if args.max_workspace_mb is not None else None
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(best: LogprobTiles, trials: list[Trial], complete: bool) -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(tuning_record(problem, start, best, trials, complete), indent=1) + "\n")
        tmp.replace(out)

    best, trials = tune(
        problem, start, repeats=args.repeats, kernels=args.kernels, max_workspace_bytes=budget,
        log=lambda line: print(line, flush=True), on_knob=lambda best, trials: write(best, trials, False),
    )  # fmt: skip
    write(best, trials, True)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
