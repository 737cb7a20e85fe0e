"""Ahead-of-time compilation of the log-prob kernels for a GPU architecture, without a GPU.

Compiles every kernel of ``bao_fast.kernels.logprobs`` with the tiles ``tiles_for_arch`` picks, down to a
cubin (Triton's bundled ptxas), and reports shared memory, registers, spills and whether the main loops became
tensor-core MMAs fed by asynchronous copies. Use it to check tile configs (shared-memory fit, pipelining) on a
machine without the target GPU. Arguments are specialised the way a real launch specialises them: unit strides
are constants and pointers / leading strides are 16-byte aligned.

    python -m bao_fast.kernels.logprobs_aot --arch 90 --dtype bfloat16

Needs the JIT, so ``TRITON_INTERPRET`` must not be set.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

import torch
from bao_fast.kernels import aot
from bao_fast.kernels import logprobs as lk
from bao_fast.kernels.logprobs_configs import Tile, tiles_for_arch

_SCALARS = {
    "K": int, "V": int, "H": int, "split_cols": int, "v_lo": int, "V_CHUNK": int, "num_splits": int,
    "inv_temp": float, "ignore_index": "i64",
}  # fmt: skip
_F32_POINTERS = ("part_ptr", "logp_ptr", "ent_ptr", "lse_ptr", "glogp_ptr", "gent_ptr", "db_ptr", "acc_ptr")
_INT_POINTERS = ("tgt_ptr", "rows_ptr")
_UNIT_STRIDES = ("stride_hh", "stride_wh", "stride_dwh", "stride_dhh")
_ALIGNED_SCALARS = ("H", "V_CHUNK")


def _tile_args(tile: Tile, m: str, n: str, k: str) -> dict[str, int]:
    return {m: tile.block_m, n: tile.block_n, k: tile.block_k, "GROUP_M": tile.group_m}


def _kernels(major: int, dtype: torch.dtype) -> dict[str, tuple[object, dict[str, object], Tile | None]]:
    """name -> (jit kernel, constexpr arguments, tile) with every feature flag on."""
    tiles = tiles_for_arch(major, dtype)
    prec = lk._precision(dtype)
    return {
        "fwd": (lk._fwd_kernel, {"HAS_BIAS": True, "HAS_ROWS": True, "WITH_ENTROPY": True, "PRECISION": prec,
                                 "BLOCK_M": tiles.fwd.block_m, "BLOCK_N": tiles.fwd.block_n,
                                 "BLOCK_K": tiles.fwd.block_k}, tiles.fwd),
        "combine": (lk._combine_kernel, {"HAS_ROWS": True, "WITH_ENTROPY": True, "BLOCK": 128}, None),
        "dlogits": (lk._dlogits_kernel, {"HAS_BIAS": True, "HAS_ROWS": True, "HAS_GENT": True, "PRECISION": prec,
                                         **_tile_args(tiles.dlogits, "BLOCK_M", "BLOCK_N", "BLOCK_K")}, tiles.dlogits),
        "dw": (lk._dw_kernel, {"HAS_ROWS": True, "HAS_BIAS": True, "PRECISION": prec,
                               **_tile_args(tiles.dw, "BLOCK_V", "BLOCK_H", "BLOCK_R")}, tiles.dw),
        "dh": (lk._dh_kernel, {"HAS_ROWS": True, "FIRST": False, "LAST": True, "PRECISION": prec,
                               **_tile_args(tiles.dh, "BLOCK_M", "BLOCK_H", "BLOCK_V")}, tiles.dh),
    }  # fmt: skip


def _spec(fn, dtype: torch.dtype, constexprs: dict[str, object], tile: Tile | None) -> aot.KernelSpec:
    """As a real launch specialises it: unit strides constant, pointers, leading strides, H and V_CHUNK
    16-aligned."""
    args: dict[str, aot.ArgKind] = {}
    for name in fn.arg_names:
        if name in constexprs or name in _UNIT_STRIDES:
            continue
        if name in _F32_POINTERS:
            args[name] = torch.float32
        elif name in _INT_POINTERS:
            args[name] = torch.int64
        elif name.endswith("_ptr"):
            args[name] = dtype
        elif name.startswith("stride"):
            args[name] = "i64"
        else:
            args[name] = _SCALARS[name]
    strides = [name for name in args if name.startswith("stride")]
    options = {"num_warps": tile.num_warps, "num_stages": tile.num_stages} if tile else {"num_warps": 4}
    return aot.launch_spec(fn, args, constexprs, unit=_UNIT_STRIDES, aligned=(*strides, *_ALIGNED_SCALARS), **options)


def compile_kernels(arch: int, dtype: torch.dtype, names: list[str] | None = None) -> dict[str, aot.KernelReport]:
    """Compile the kernels (all, or ``names``) for ``sm_{arch}`` (e.g. 90) and report on each."""
    jobs = {
        name: (_spec(fn, dtype, constexprs, tile), arch)
        for name, (fn, constexprs, tile) in _kernels(arch // 10, dtype).items()
        if names is None or name in names
    }
    return aot.compile_kernels(jobs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="AOT-compile the log-prob kernels and report on them")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10: 80, 86, 89, 90")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--kernels", nargs="*", default=None, help="subset of: fwd combine dlogits dw dh")
    args = parser.parse_args(argv)
    reports = compile_kernels(args.arch, getattr(torch, args.dtype), args.kernels)
    print(json.dumps({name: asdict(r) for name, r in reports.items()}))


if __name__ == "__main__":
    main()
