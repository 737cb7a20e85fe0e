"""Tile configurations of the token log-prob kernels (``kernels/logprobs.py``), kept apart from the kernels.

One :class:`LogprobTiles` per (architecture, dtype class). The Hopper/Ampere entries are starting points
sized for tensor-core ``tl.dot`` tiles (bf16/fp16 operands, fp32 accumulators) and must be re-tuned with
``benchmarks/bench_logprobs.py`` on the target GPU; the interpreter entry uses the smallest tiles
``tl.dot`` accepts so CPU tests stay fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tile:
    """One kernel's launch shape: rows x vocab (or x hidden) tile, reduction step, warps, pipeline stages and
    ``group_m``, the row tiles per group of the L2-friendly tile order."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    group_m: int = 8


@dataclass(frozen=True)
class LogprobTiles:
    """Tiles of the four kernels plus the byte budget of one backward chunk of logit gradients.

    ``fwd``: rows x vocab tile, ``block_k`` steps over H. ``dlogits``: same, backward recompute.
    ``dw``: vocab x hidden tile (``block_m``/``block_n``), ``block_k`` rows per step of the row loop.
    ``dh``: rows x hidden tile (``block_m``/``block_n``), ``block_k`` vocab columns per step.
    ``chunk_bytes``: the ``[K, V_chunk]`` gradient buffer of the backward is capped at this many bytes.
    """

    fwd: Tile
    dlogits: Tile
    dw: Tile
    dh: Tile
    chunk_bytes: int = 256 << 20


# group_m=2 so that small test shapes span several tile groups.
_INTERPRETER = LogprobTiles(
    fwd=Tile(16, 32, 16, group_m=2),
    dlogits=Tile(16, 32, 16, group_m=2),
    dw=Tile(32, 32, 16, group_m=2),
    dh=Tile(16, 32, 32, group_m=2),
    chunk_bytes=1 << 20,
)

# Hopper (sm_90): 128x128 bf16 wgmma-sized tiles, 8 warps (two warp groups), deep pipelining over H.
_SM90_16BIT = LogprobTiles(
    fwd=Tile(128, 128, 64, num_warps=8, num_stages=4),
    dlogits=Tile(128, 128, 64, num_warps=8, num_stages=4),
    dw=Tile(128, 128, 64, num_warps=8, num_stages=4),
    dh=Tile(128, 128, 64, num_warps=8, num_stages=4),
)
# Ampere (sm_80/sm_86/sm_89): mma.sync tiles, smaller shared-memory budget.
_SM80_16BIT = LogprobTiles(
    fwd=Tile(128, 128, 32, num_warps=8, num_stages=3),
    dlogits=Tile(128, 128, 32, num_warps=8, num_stages=3),
    dw=Tile(128, 128, 32, num_warps=8, num_stages=3),
    dh=Tile(128, 128, 32, num_warps=8, num_stages=3),
)
# fp32 operands double the shared-memory footprint of a tile: halve the reduction step.
_FP32 = LogprobTiles(
    fwd=Tile(64, 128, 32, num_warps=8, num_stages=3),
    dlogits=Tile(64, 128, 32, num_warps=8, num_stages=3),
    dw=Tile(64, 128, 32, num_warps=8, num_stages=3),
    dh=Tile(64, 128, 32, num_warps=8, num_stages=3),
)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tiles_for_arch(major: int, dtype: torch.dtype) -> LogprobTiles:
    """The tile set for ``dtype`` operands on a GPU of compute capability ``major``.x."""
    if dtype == torch.float32:
        return _FP32
    return _SM90_16BIT if major >= 9 else _SM80_16BIT


def select_tiles(device: torch.device, dtype: torch.dtype) -> LogprobTiles:
    """The tile set for ``dtype`` operands on ``device`` (interpreter tiles on a CPU device)."""
    if device.type != "cuda" or interpreting():
        return _INTERPRETER
    return tiles_for_arch(torch.cuda.get_device_capability(device)[0], dtype)
