"""Ahead-of-time compile check of the ``shaped_advantages`` kernels for real GPUs, without a GPU.

Compiles every jit kernel of ``bao_fast.kernels.advantages`` with every constexpr combination
``shaped_advantages_triton`` launches (turn credit x trajectory score, std normalisation on / off), each as
a generic launch (aligned tensors, sizes of no particular value) for float32 and float64 rewards, and (float32)
as the launch of a one-trajectory, one-turn, one-token batch (sizes of 1 become constants):

    python -m bao_fast.kernels.advantages_aot --arch 80 90 --dtype float32 float64

Prints one JSON line ``{"sm90/float32/<kernel>:<flags>": KernelReport fields}``. Needs the JIT, so
``TRITON_INTERPRET`` must not be set.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from bao_fast.kernels import advantages as ak
from bao_fast.kernels import aot
from triton.runtime.jit import JITFunction

DTYPES = ("float32", "float64")


def kernel_specs(dtype: torch.dtype) -> dict[str, aot.KernelSpec]:
    """``<kernel>:<flags>,ints=<any|one>`` -> spec, for rewards of ``dtype`` (float32 / float64)."""
    int32 = torch.int32
    int_modes = ("any", "one") if dtype == torch.float32 else ("any",)
    count_args = {"token_turn_ids_ptr": int32, "counts_ptr": int32, "num_tokens": int}
    shaping_args = {
        "rewards_ptr": dtype, "answer_ptr": torch.uint8, "offsets_ptr": int32, "credits_ptr": dtype,
        "scores_ptr": dtype, "num_traj": int, "gamma": "fp64", "info_seeking_coef": "fp64",
        "overthinking_coef": "fp64", "horizon": int,
    }  # fmt: skip
    normalize_args = {
        "scores_ptr": dtype, "group_ptr": torch.int64, "offsets_ptr": int32, "credits_ptr": dtype,
        "counts_ptr": int32, "normalized_ptr": dtype, "turn_adv_ptr": dtype, "num_traj": int, "eps": "fp64",
    }  # fmt: skip
    gather_args = {"token_turn_ids_ptr": int32, "turn_adv_ptr": dtype, "out_ptr": dtype, "num_tokens": int}

    launches: list[tuple[str, dict[str, object], JITFunction, dict[str, aot.ArgKind], dict[str, object]]] = [
        ("turn_token_count", {}, ak._turn_token_count_kernel, count_args, {"BLOCK": ak.TOKEN_BLOCK}),
        ("token_gather", {}, ak._token_gather_kernel, gather_args, {"BLOCK": ak.TOKEN_BLOCK}),
    ]
    for (credit, credit_code), (score, score_code) in itertools.product(
        ak._CREDIT_CODES.items(), ak._SCORE_CODES.items()
    ):
        constexprs = {"CREDIT": credit_code, "SCORE": score_code, "BLOCK_B": ak.TRAJ_BLOCK}
        flags = {"credit": credit, "score": score}
        launches.append(("trajectory_shaping", flags, ak._trajectory_shaping_kernel, shaping_args, constexprs))
    for norm_by_std in (False, True):
        constexprs = {"NORM_BY_STD": norm_by_std, "BLOCK_B": ak.TRAJ_BLOCK, "BLOCK_J": ak.GROUP_TILE}
        flags = {"norm_by_std": norm_by_std}
        launches.append(("group_normalize", flags, ak._group_normalize_kernel, normalize_args, constexprs))

    return {
        kernel + ":" + ",".join(f"{k}={v}" for k, v in {**flags, "ints": ints}.items()): aot.launch_spec(
            fn, args, constexprs, ints=ints
        )
        for kernel, flags, fn, args, constexprs in launches
        for ints in int_modes
    }


def main(argv: Sequence[str] | None = None) -> None:
    description = "AOT-compile the shaped-advantage kernels and report on them"
    aot.run_cli(argv, description, lambda arch, dtype: kernel_specs(dtype), DTYPES)


if __name__ == "__main__":
    main()
