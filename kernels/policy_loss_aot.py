"""Ahead-of-time compile check of the ``clipped_ratio_loss`` kernels for real GPUs, without a GPU.

Compiles every jit kernel of ``bao_fast.kernels.policy_loss`` the way ``clipped_ratio_loss_triton`` launches
it: each aggregation's sequence layout (token-mean without ``cu_seqlens``, a scalar weight with
``cu_seqlens``, per-sequence weights) x reference policy off / on with each KL type, for float32 and float64
log-probs, each as a generic launch and (float32) as the launch of a one-token, one-sequence batch:

    python -m bao_fast.kernels.policy_loss_aot --arch 80 90 --dtype float32 float64

Without a reference the kernel never reads ``KL_TYPE``, so one KL type stands for all three there. Prints one
JSON line ``{"sm90/float32/<kernel>:<flags>": KernelReport fields}``. Needs the JIT, so ``TRITON_INTERPRET``
must not be set.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from bao_fast.kernels import aot
from bao_fast.kernels import policy_loss as pk

DTYPES = ("float32", "float64")
# sequence layout -> (dtype of what the launcher passes as cu_seqlens, PER_SEQ_WEIGHT); "scalar-weight" is
# token-mean with cu_seqlens, seq-mean-token-sum and seq-mean-token-sum-norm
_LAYOUTS = {
    "token-mean-without-cu-seqlens": (torch.bool, False),
    "scalar-weight": (torch.int32, False),
    "seq-mean-token-mean": (torch.int32, True),
}


def kernel_specs(dtype: torch.dtype) -> dict[str, aot.KernelSpec]:
    """``<kernel>:<flags>,ints=<any|one>`` -> spec, for log-probs of ``dtype`` (float32 / float64)."""
    int_modes = ("any", "one") if dtype == torch.float32 else ("any",)
    specs = {}
    count_args = {"mask_ptr": torch.uint8, "cu_seqlens_ptr": torch.int32, "counts_ptr": torch.int32}
    specs["seq_mask_count:ints=any"] = aot.launch_spec(pk._seq_mask_count_kernel, count_args, {"BLOCK": pk.SEQ_BLOCK})
    refs = [("off", False, 0)] + [(kl, True, code) for kl, code in pk._KL_CODES.items()]
    for (layout, (cu_dtype, per_seq)), (ref, has_ref, kl_code), ints in itertools.product(
        _LAYOUTS.items(), refs, int_modes
    ):
        args = {
            **dict.fromkeys(("logp_ptr", "old_logp_ptr", "adv_ptr"), dtype),
            "mask_ptr": torch.uint8, "ref_logp_ptr": dtype, "cu_seqlens_ptr": cu_dtype, "weight_ptr": dtype,
            "grad_ptr": dtype, "partials_ptr": torch.float64, "num_tokens": int, "num_seqs": int,
            "search_steps": int, **dict.fromkeys(("clip_low", "clip_high", "dual_clip", "kl_coef"), "fp64"),
        }  # fmt: skip
        constexprs = {"HAS_REF": has_ref, "KL_TYPE": kl_code, "PER_SEQ_WEIGHT": per_seq, "BLOCK": pk.TOKEN_BLOCK}
        unit: tuple[str, ...] = ()
        if cu_dtype is torch.bool:  # no cu_seqlens: num_seqs = 0 (a multiple of 16), one search step
            args["num_seqs"] = "i32"
            del args["search_steps"]
            unit = ("search_steps",)
        specs[f"clipped_ratio_loss:layout={layout},ref={ref},ints={ints}"] = aot.launch_spec(
            pk._clipped_ratio_loss_kernel,
            args,
            constexprs,
            ints=ints,
            unit=unit,
            aligned=("num_seqs",) if unit else (),
            num_warps=pk.LOSS_NUM_WARPS,
        )
    return specs


def main(argv: Sequence[str] | None = None) -> None:
    description = "AOT-compile the clipped-ratio loss kernels and report on them"
    aot.run_cli(argv, description, lambda arch, dtype: kernel_specs(dtype), DTYPES)


if __name__ == "__main__":
    main()
