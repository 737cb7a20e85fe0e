"""The AOT helpers build the signature a launch specialises, reject incomplete specs and flag kernels that
overflow shared memory or spill (no compilation here: that is what the per-module ``*_aot`` tests do)."""

from __future__ import annotations

import pytest
import torch
from bao_fast.kernels import advantages as ak
from bao_fast.kernels.aot import SHARED_MEMORY_LIMITS, KernelReport, KernelSpec, launch_spec

ARGS = {"token_turn_ids_ptr": torch.int32, "turn_adv_ptr": torch.float64, "out_ptr": torch.float64, "num_tokens": int}


def test_launch_spec_specialises_like_a_launch() -> None:
    spec = launch_spec(ak._token_gather_kernel, ARGS, {"BLOCK": 256}, num_warps=8)
    assert spec.signature == {"token_turn_ids_ptr": "*i32", "turn_adv_ptr": "*fp64", "out_ptr": "*fp64",
                              "num_tokens": "i32"}  # fmt: skip
    assert spec.aligned == {"token_turn_ids_ptr", "turn_adv_ptr", "out_ptr"}
    assert (spec.constexprs, spec.num_warps) == ({"BLOCK": 256}, 8)

    ones = launch_spec(ak._token_gather_kernel, ARGS, {"BLOCK": 256}, ints="one")
    assert ones.constexprs == {"BLOCK": 256, "num_tokens": 1}
    assert "num_tokens" not in ones.signature

    explicit = launch_spec(
        ak._token_gather_kernel, {**ARGS, "num_tokens": "i64"}, {"BLOCK": 256}, aligned=["num_tokens"]
    )
    assert explicit.signature["num_tokens"] == "i64"
    assert "num_tokens" in explicit.aligned

    sizes_dropped = {name: kind for name, kind in ARGS.items() if name != "num_tokens"}
    unit = launch_spec(ak._token_gather_kernel, sizes_dropped, {"BLOCK": 256}, unit=["num_tokens", "not_an_arg"])
    assert unit.constexprs == {"BLOCK": 256, "num_tokens": 1}


def test_bad_specs_name_the_argument() -> None:
    with pytest.raises(TypeError, match="num_tokens"):
        launch_spec(ak._token_gather_kernel, {**ARGS, "num_tokens": 3}, {"BLOCK": 256})
    with pytest.raises(ValueError, match="ints"):
        launch_spec(ak._token_gather_kernel, ARGS, {"BLOCK": 256}, ints="two")
    partial = KernelSpec(ak._token_gather_kernel, {"out_ptr": "*fp32"}, {"BLOCK": 256})
    with pytest.raises(ValueError, match="turn_adv_ptr"):
        partial.source()


def test_problems_flag_shared_memory_and_spills() -> None:
    fields = dict(num_warps=4, registers=64, wgmma=0, mma_sync=0, cp_async=0)
    fits = KernelReport(shared_bytes=SHARED_MEMORY_LIMITS[80] - 1024, static_shared_bytes=1024, stack_bytes=0,
                        local_bytes=0, **fields)  # fmt: skip
    assert fits.problems(80) == []
    assert len(fits.problems(86)) == 1 and "shared memory" in fits.problems(86)[0]
    spills = KernelReport(shared_bytes=0, static_shared_bytes=0, stack_bytes=48, local_bytes=0, **fields)
    assert [p.startswith("register spills") for p in spills.problems(90)] == [True]
    with pytest.raises(ValueError, match="arch"):
        spills.problems(75)
