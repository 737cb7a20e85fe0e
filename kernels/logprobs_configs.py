"""Tile configurations of the token log-prob kernels (``kernels/logprobs.py``), kept apart from the kernels.

One :class:`LogprobTiles` per (GPU architecture, input dtype). Where it comes from, first match wins:

1. ``$BAO_FAST_TUNED_DIR/logprobs-sm<major><minor>-<dtype>.json`` (tiles you tuned for your own GPU);
2. the same file name under ``bao_fast/kernels/tuned/`` (tunings committed with the package);
3. the built-in defaults below: tensor-core tiles chosen so that every kernel compiles without register
   spills and within shared memory for sm_80 and sm_90 (``python -m bao_fast.kernels.logprobs_aot``).

``python -m bao_fast.kernels.logprobs_tune`` times candidate tiles on the GPU it runs on and writes file 1 or 2.
The interpreter (``TRITON_INTERPRET=1``) always uses the smallest tiles ``tl.dot`` accepts so tests stay fast.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

TUNED_DIR = Path(__file__).resolve().parent / "tuned"
TUNED_DIR_ENV = "BAO_FAST_TUNED_DIR"
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
"""Input dtypes the kernels take, by the name tuning files and command lines use."""
KERNEL_TILES = ("fwd", "dlogits", "dw", "dh")
"""The kernels with a :class:`Tile` in :class:`LogprobTiles` (the combine kernel has a fixed shape)."""
_WARPS = (1, 2, 4, 8, 16)


def _is_power_of_two(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


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

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or not _is_power_of_two(value):
                raise ValueError(f"Tile.{name} must be a power of two >= 16 (tl.dot's minimum), got {value!r}")
        if self.num_warps not in _WARPS:
            raise ValueError(f"Tile.num_warps must be one of {_WARPS}, got {self.num_warps!r}")
        for name in ("num_stages", "group_m"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Tile.{name} must be an int >= 1, got {value!r}")

    def label(self) -> str:
        """``"128x128x64/w8/s4/g8"``: the tile in one token, for logs and tables."""
        return f"{self.block_m}x{self.block_n}x{self.block_k}/w{self.num_warps}/s{self.num_stages}/g{self.group_m}"


@dataclass(frozen=True)
class LogprobTiles:
    """Tiles of the four GEMM-like kernels plus two sizes of the launchers.

    ``fwd``: rows x vocab tile, ``block_k`` steps over H. ``dlogits``: same, backward recompute.
    ``dw``: vocab x hidden tile (``block_m``/``block_n``), ``block_k`` rows per step of the row loop.
    ``dh``: rows x hidden tile (``block_m``/``block_n``), ``block_k`` vocab columns per step.
    ``chunk_bytes``: the ``[K, V_chunk]`` gradient buffer of the backward is capped at this many bytes.
    ``fwd_split_divisor``: the forward splits the vocab into about ``SMs / fwd_split_divisor`` parts.
    """

    fwd: Tile
    dlogits: Tile
    dw: Tile
    dh: Tile
    chunk_bytes: int = 256 << 20
    fwd_split_divisor: int = 8

    def __post_init__(self) -> None:
        for name in KERNEL_TILES:
            if not isinstance(getattr(self, name), Tile):
                raise TypeError(f"LogprobTiles.{name} must be a Tile, got {type(getattr(self, name)).__name__}")
        for name in ("chunk_bytes", "fwd_split_divisor"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LogprobTiles.{name} must be an int >= 1, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LogprobTiles:
        """Inverse of :meth:`to_dict`; raises ValueError naming the offending key."""
        if not isinstance(data, dict):
            raise ValueError(f"tiles must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        missing = sorted(set(KERNEL_TILES) - set(data))
        if unknown or missing:
            raise ValueError(f"tiles: unknown keys {unknown}, missing keys {missing}")
        tile_keys = {f.name for f in fields(Tile)}
        values: dict[str, Any] = {}
        for name, value in data.items():
            if name in KERNEL_TILES:
                if not isinstance(value, dict) or not set(value) <= tile_keys:
                    raise ValueError(f"tiles.{name} must be an object with keys from {sorted(tile_keys)}: {value!r}")
                try:
                    values[name] = Tile(**value)
                except (TypeError, ValueError) as err:
                    raise ValueError(f"tiles.{name}: {err}") from err
            else:
                values[name] = value
        return cls(**values)


def load_tiles(path: Path) -> LogprobTiles:
    """The ``"tiles"`` object of a tuning file written by ``python -m bao_fast.kernels.logprobs_tune``."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict) or "tiles" not in data:
        raise ValueError(f"{path}: expected a JSON object with a 'tiles' key")
    try:
        return LogprobTiles.from_dict(data["tiles"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err


def tuned_file_name(capability: tuple[int, int], dtype: torch.dtype) -> str:
    """``logprobs-sm90-bfloat16.json`` for capability (9, 0) and bf16."""
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {list(DTYPE_NAMES.values())}, got {dtype}")
    return f"logprobs-sm{capability[0]}{capability[1]}-{DTYPE_NAMES[dtype]}.json"


# group_m=2 so that small test shapes span several tile groups.
INTERPRETER_TILES = LogprobTiles(
    fwd=Tile(16, 32, 16, group_m=2),
    dlogits=Tile(16, 32, 16, group_m=2),
    dw=Tile(32, 32, 16, group_m=2),
    dh=Tile(16, 32, 32, group_m=2),
    chunk_bytes=1 << 20,
)

# Hopper (sm_90): 128x128 bf16 wgmma tiles, 8 warps (two warp groups), 4-deep cp.async pipeline over H.
# Spill-free (logprobs_aot, bf16, registers with flags off / on): fwd 212 / 242, dlogits 130 / 197, dw 96 / 123,
# dh 184 / 106.
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
# fp32 operands take IEEE FMA loops, not tensor cores: smaller tiles keep the backward within 255 registers.
_FP32 = LogprobTiles(
    fwd=Tile(64, 128, 32, num_warps=8, num_stages=4),
    dlogits=Tile(64, 64, 32, num_warps=8, num_stages=3),
    dw=Tile(64, 128, 16, num_warps=8, num_stages=3),
    dh=Tile(64, 128, 32, num_warps=8, num_stages=3),
)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_tiles(major: int, dtype: torch.dtype) -> LogprobTiles:
    """The built-in tile set for ``dtype`` operands on a GPU of compute capability ``major``.x."""
    if dtype == torch.float32:
        return _FP32
    return _SM90_16BIT if major >= 9 else _SM80_16BIT


@functools.cache
def _tiles_cached(capability: tuple[int, int], dtype: torch.dtype, user_dir: str) -> LogprobTiles:
    name = tuned_file_name(capability, dtype)
    for directory in (Path(user_dir) if user_dir else None, TUNED_DIR):
        if directory is not None and (directory / name).is_file():
            return load_tiles(directory / name)
    return default_tiles(capability[0], dtype)


def tiles_for_arch(capability: tuple[int, int], dtype: torch.dtype) -> LogprobTiles:
    """The tile set for ``dtype`` operands on a GPU of compute ``capability`` (tuned file or default)."""
    return _tiles_cached(tuple(capability), dtype, os.environ.get(TUNED_DIR_ENV, ""))


def select_tiles(device: torch.device, dtype: torch.dtype) -> LogprobTiles:
    """The tile set for ``dtype`` operands on ``device`` (interpreter tiles on a CPU device)."""
    if device.type != "cuda" or interpreting():
        return INTERPRETER_TILES
    return tiles_for_arch(torch.cuda.get_device_capability(device), dtype)
