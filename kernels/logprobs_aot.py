"""Ahead-of-time compilation of the log-prob kernels for a GPU architecture, without a GPU.

Compiles every kernel of ``bao_fast.kernels.logprobs`` with the tiles ``tiles_for_arch`` picks (a tuned file
when one exists, else the defaults), with every feature flag off and every flag on, down to a cubin (Triton's
bundled ptxas), and reports shared memory, registers, spills and whether the main loops became tensor-core MMAs
fed by asynchronous copies. Use it to check tile configs (shared-memory fit, no spills) on a machine without
the target GPU. Arguments are specialised the way a real launch specialises them: unit strides are constants,
pointers / leading strides are 16-byte aligned, and strides and ``ignore_index`` are i32 (Triton types a Python
int that fits in 32 bits so; the kernels widen row offsets to int64 themselves).

    python -m bao_fast.kernels.logprobs_aot --arch 80 90 --dtype bfloat16 float32

Needs the JIT, so ``TRITON_INTERPRET`` must not be set.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from bao_fast.kernels import aot
from bao_fast.kernels import logprobs as lk
from bao_fast.kernels.logprobs_configs import DTYPE_NAMES, LogprobTiles, Tile, tiles_for_arch

DTYPES = tuple(DTYPE_NAMES.values())
_SCALARS = {
    "K": int, "V": int, "H": int, "split_cols": int, "v_lo": int, "V_CHUNK": int, "num_splits": int,
    "inv_temp": float, "ignore_index": "i32",
}  # fmt: skip
_F32_POINTERS = ("part_ptr", "logp_ptr", "ent_ptr", "lse_ptr", "glogp_ptr", "gent_ptr", "db_ptr", "acc_ptr")
_INT_POINTERS = ("tgt_ptr", "rows_ptr")
_UNIT_STRIDES = ("stride_hh", "stride_wh", "stride_dwh", "stride_dhh")
_ALIGNED_SCALARS = ("H", "V_CHUNK")
# Feature flags of each kernel; each is compiled with all of them off and all of them on.
_FLAGS = {
    "fwd": ("HAS_BIAS", "HAS_ROWS", "WITH_ENTROPY", "EVEN_K"),
    "combine": ("HAS_ROWS", "WITH_ENTROPY"),
    "dlogits": ("HAS_BIAS", "HAS_ROWS", "HAS_GENT", "EVEN_K"),
    "dw": ("HAS_ROWS", "HAS_BIAS"),
    "dh": ("HAS_ROWS", "FIRST", "LAST"),
}


def _tile_args(tile: Tile, m: str, n: str, k: str, group: bool = True) -> dict[str, int]:
    args = {m: tile.block_m, n: tile.block_n, k: tile.block_k}
    return {**args, "GROUP_M": tile.group_m} if group else args


def _kernels(tiles: LogprobTiles, dtype: torch.dtype) -> dict[str, tuple[object, dict[str, object], Tile | None]]:
    """name -> (jit kernel, constexpr arguments other than the feature flags, tile)."""
    prec = {"PRECISION": lk._precision(dtype)}
    return {
        "fwd": (lk._fwd_kernel, {**prec, **_tile_args(tiles.fwd, "BLOCK_M", "BLOCK_N", "BLOCK_K", False)}, tiles.fwd),
        "combine": (lk._combine_kernel, {"BLOCK": 128}, None),
        "dlogits": (lk._dlogits_kernel, {**prec, **_tile_args(tiles.dlogits, "BLOCK_M", "BLOCK_N", "BLOCK_K")},
                    tiles.dlogits),
        "dw": (lk._dw_kernel, {**prec, **_tile_args(tiles.dw, "BLOCK_V", "BLOCK_H", "BLOCK_R")}, tiles.dw),
        "dh": (lk._dh_kernel, {**prec, **_tile_args(tiles.dh, "BLOCK_M", "BLOCK_H", "BLOCK_V")}, tiles.dh),
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
            args[name] = "i32"
        else:
            args[name] = _SCALARS[name]
    strides = [name for name in args if name.startswith("stride")]
    options = {"num_warps": tile.num_warps, "num_stages": tile.num_stages} if tile else {"num_warps": 4}
    return aot.launch_spec(fn, args, constexprs, unit=_UNIT_STRIDES, aligned=(*strides, *_ALIGNED_SCALARS), **options)


def kernel_specs(arch: int, dtype: torch.dtype, tiles: LogprobTiles | None = None) -> dict[str, aot.KernelSpec]:
    """``"<kernel>:flags=off|on"`` -> spec, for ``sm_{arch}`` with ``tiles`` (default: ``tiles_for_arch``)."""
    tiles = tiles or tiles_for_arch((arch // 10, arch % 10), dtype)
    specs = {}
    for name, (fn, constexprs, tile) in _kernels(tiles, dtype).items():
        for on in (False, True):
            flags = dict.fromkeys(_FLAGS[name], on)
            specs[f"{name}:flags={'on' if on else 'off'}"] = _spec(fn, dtype, {**constexprs, **flags}, tile)
    return specs


def main(argv: Sequence[str] | None = None) -> None:
    aot.run_cli(argv, "AOT-compile the log-prob kernels and report on them", kernel_specs, DTYPES)


if __name__ == "__main__":
    main()
