"""Ahead-of-time compilation of the log-prob kernels for a GPU architecture, without a GPU.

Compiles every kernel of ``bao_fast.kernels.logprobs`` with the tiles ``tiles_for_arch`` picks, down to a
cubin (Triton's bundled ptxas), and reports shared memory and whether the main loops became tensor-core MMAs
fed by asynchronous copies. Use it to check tile configs (shared-memory fit, pipelining) on a machine without
the target GPU. Arguments are specialised the way a real launch specialises them: unit strides are constants
and pointers / leading strides are 16-byte aligned.

    python -m bao_fast.kernels.logprobs_aot --arch 90 --dtype bfloat16

Needs the JIT, so ``TRITON_INTERPRET`` must not be set.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import torch
import triton
from bao_fast.kernels import logprobs as lk
from bao_fast.kernels.logprobs_configs import Tile, tiles_for_arch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_TRITON_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_SCALARS = {
    "K": "i32", "V": "i32", "H": "i32", "split_cols": "i32", "v_lo": "i32", "V_CHUNK": "i32", "num_splits": "i32",
    "inv_temp": "fp32", "ignore_index": "i64",
}  # fmt: skip
_F32_POINTERS = ("part_ptr", "logp_ptr", "ent_ptr", "lse_ptr", "glogp_ptr", "gent_ptr", "db_ptr", "acc_ptr")
_INT_POINTERS = ("tgt_ptr", "rows_ptr")
_UNIT_STRIDES = ("stride_hh", "stride_wh", "stride_dwh", "stride_dhh")


@dataclass(frozen=True)
class KernelReport:
    """What one compiled kernel looks like: shared memory bytes and instruction counts in its PTX."""

    shared_bytes: int
    num_warps: int
    wgmma: int
    mma_sync: int
    cp_async: int


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


def _source(fn, dtype: torch.dtype, constexprs: dict[str, object]) -> ASTSource:
    """Signature as a real launch specialises it: unit strides constant, pointers and strides 16-aligned."""
    constexprs = {**constexprs, **{name: 1 for name in _UNIT_STRIDES if name in fn.arg_names}}
    signature: dict[str, str] = {}
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name in _F32_POINTERS:
            signature[name] = "*fp32"
        elif name in _INT_POINTERS:
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = f"*{_TRITON_DTYPES[dtype]}"
        elif name.startswith("stride"):
            signature[name] = "i64"
        else:
            signature[name] = _SCALARS[name]
        if name.endswith("_ptr") or name.startswith("stride") or name in ("H", "V_CHUNK"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature=signature, constexprs=constexprs, attrs=attrs)


def compile_kernels(arch: int, dtype: torch.dtype, names: list[str] | None = None) -> dict[str, KernelReport]:
    """Compile the kernels (all, or ``names``) for ``sm_{arch}`` (e.g. 90) and report on each."""
    target = GPUTarget("cuda", arch, 32)
    reports = {}
    for name, (fn, constexprs, tile) in _kernels(arch // 10, dtype).items():
        if names is not None and name not in names:
            continue
        options = {"num_warps": tile.num_warps, "num_stages": tile.num_stages} if tile else {"num_warps": 4}
        kernel = triton.compile(_source(fn, dtype, constexprs), target=target, options=options)
        ptx = kernel.asm["ptx"]
        reports[name] = KernelReport(
            shared_bytes=kernel.metadata.shared,
            num_warps=options["num_warps"],
            wgmma=ptx.count("wgmma.mma_async"),
            mma_sync=ptx.count("mma.sync"),
            cp_async=ptx.count("cp.async"),
        )
    return reports


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
