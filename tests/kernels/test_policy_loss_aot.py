"""The clipped-ratio loss kernels compile for Ampere and Hopper without a GPU (the interpreter accepts code the
JIT rejects), for every configuration the launcher can meet, within shared memory and without spills."""

from __future__ import annotations

import itertools

from bao_fast.algo.loss import KL_TYPES

LAYOUTS = ("token-mean-without-cu-seqlens", "scalar-weight", "seq-mean-token-mean")


def test_every_launch_compiles_for_sm80_and_sm90(run_aot, check_launch_reports) -> None:
    reports = run_aot("policy_loss_aot", "--arch", "80", "90", "--workers", "2", tools=("ptxas", "cuobjdump"))

    expected = set()
    for arch, dtype in itertools.product((80, 90), ("float32", "float64")):
        prefix = f"sm{arch}/{dtype}/"
        expected.add(prefix + "seq_mask_count:ints=any")
        expected |= {
            f"{prefix}clipped_ratio_loss:layout={layout},ref={ref},ints=any"
            for layout, ref in itertools.product(LAYOUTS, ("off", *KL_TYPES))
        }
    check_launch_reports(reports, expected)
