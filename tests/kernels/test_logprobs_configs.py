"""Tile configs of the log-prob kernels: validation, tuning files and where ``select_tiles`` finds them."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from bao_fast.kernels import logprobs_configs as lc
from bao_fast.kernels.logprobs_configs import (
    INTERPRETER_TILES,
    LogprobTiles,
    Tile,
    default_tiles,
    load_tiles,
    select_tiles,
    tiles_for_arch,
    tuned_file_name,
)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block_m": 48}, "Tile.block_m"),
        ({"block_n": 8}, "Tile.block_n"),
        ({"block_k": 0}, "Tile.block_k"),
        ({"num_warps": 3}, "Tile.num_warps"),
        ({"num_stages": 0}, "Tile.num_stages"),
        ({"group_m": -1}, "Tile.group_m"),
    ],
)
def test_bad_tile_names_the_field(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        Tile(**{"block_m": 64, "block_n": 64, "block_k": 32, **kwargs})


def test_tiles_round_trip_through_dict() -> None:
    tiles = replace(default_tiles(9, torch.bfloat16), chunk_bytes=123 << 20, fwd_split_divisor=4)
    assert LogprobTiles.from_dict(json.loads(json.dumps(tiles.to_dict()))) == tiles


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("dw"), r"missing keys \['dw'\]"),
        (lambda d: d.update(fwd_splits=3), r"unknown keys \['fwd_splits'\]"),
        (lambda d: d["fwd"].update(block_m=96), "tiles.fwd: Tile.block_m"),
        (lambda d: d["dh"].update(warps=4), "tiles.dh must be an object with keys"),
        (lambda d: d.update(chunk_bytes=0), "LogprobTiles.chunk_bytes"),
    ],
)
def test_bad_tiles_dict_names_the_key(mutate, message) -> None:
    data = default_tiles(9, torch.bfloat16).to_dict()
    mutate(data)
    with pytest.raises(ValueError, match=message):
        LogprobTiles.from_dict(data)


def test_load_tiles_errors_name_the_file(tmp_path) -> None:
    bad_json = tmp_path / "a.json"
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match=r"a\.json: not valid JSON"):
        load_tiles(bad_json)
    no_tiles = tmp_path / "b.json"
    no_tiles.write_text(json.dumps({"op": "token_logprobs"}))
    with pytest.raises(ValueError, match=r"b\.json: expected a JSON object with a 'tiles' key"):
        load_tiles(no_tiles)
    bad_tile = tmp_path / "c.json"
    data = default_tiles(8, torch.float16).to_dict()
    data["dlogits"]["num_warps"] = 5
    bad_tile.write_text(json.dumps({"tiles": data}))
    with pytest.raises(ValueError, match=r"c\.json: tiles\.dlogits: Tile\.num_warps"):
        load_tiles(bad_tile)


def test_tuned_file_name() -> None:
    assert tuned_file_name((9, 0), torch.bfloat16) == "logprobs-sm90-bfloat16.json"
    assert tuned_file_name((8, 6), torch.float32) == "logprobs-sm86-float32.json"
    with pytest.raises(ValueError, match="dtype must be one of"):
        tuned_file_name((9, 0), torch.int32)


def test_defaults_by_arch_and_dtype() -> None:
    assert default_tiles(9, torch.bfloat16).fwd.block_k == 64
    assert default_tiles(8, torch.bfloat16).fwd.block_k == 32
    assert default_tiles(9, torch.float16) == default_tiles(9, torch.bfloat16)
    assert default_tiles(9, torch.float32) == default_tiles(8, torch.float32)
    assert default_tiles(9, torch.float32) != default_tiles(9, torch.bfloat16)


def test_user_dir_beats_packaged_file_beats_defaults(tmp_path, monkeypatch) -> None:
    packaged, user = tmp_path / "packaged", tmp_path / "user"
    packaged.mkdir()
    user.mkdir()
    monkeypatch.setattr(lc, "TUNED_DIR", packaged)
    monkeypatch.setenv(lc.TUNED_DIR_ENV, str(user))
    lc._tiles_cached.cache_clear()
    name = tuned_file_name((9, 0), torch.bfloat16)
    assert tiles_for_arch((9, 0), torch.bfloat16) == default_tiles(9, torch.bfloat16)

    packaged_tiles = replace(default_tiles(9, torch.bfloat16), chunk_bytes=64 << 20)
    (packaged / name).write_text(json.dumps({"tiles": packaged_tiles.to_dict()}))
    lc._tiles_cached.cache_clear()
    assert tiles_for_arch((9, 0), torch.bfloat16) == packaged_tiles
    assert tiles_for_arch((9, 0), torch.float32) == default_tiles(9, torch.float32)  # other dtype: no file
    assert tiles_for_arch((8, 0), torch.bfloat16) == default_tiles(8, torch.bfloat16)  # other arch: no file

    user_tiles = replace(default_tiles(9, torch.bfloat16), fwd_split_divisor=2)
    (user / name).write_text(json.dumps({"tiles": user_tiles.to_dict()}))
    lc._tiles_cached.cache_clear()
    assert tiles_for_arch((9, 0), torch.bfloat16) == user_tiles
    lc._tiles_cached.cache_clear()


def test_cpu_device_uses_interpreter_tiles() -> None:
    assert select_tiles(torch.device("cpu"), torch.bfloat16) == INTERPRETER_TILES
