"""The shaped-advantage kernels compile for Ampere and Hopper without a GPU (the interpreter accepts code the
JIT rejects), for every configuration the launcher can meet, within shared memory and without spills."""

from __future__ import annotations

import itertools

from bao_fast.algo.shaping import TRAJECTORY_SCORES, TURN_CREDITS


def test_every_launch_compiles_for_sm80_and_sm90(run_aot, check_launch_reports) -> None:
    reports = run_aot("advantages_aot", "--arch", "80", "90", "--workers", "2", tools=("ptxas", "cuobjdump"))

    expected = set()
    for arch, dtype in itertools.product((80, 90), ("float32", "float64")):
        prefix = f"sm{arch}/{dtype}/"
        expected |= {prefix + "turn_token_count:ints=any", prefix + "token_gather:ints=any"}
        expected |= {f"{prefix}group_normalize:norm_by_std={norm},ints=any" for norm in (False, True)}
        expected |= {
            f"{prefix}trajectory_shaping:credit={credit},score={score},ints=any"
            for credit, score in itertools.product(TURN_CREDITS, TRAJECTORY_SCORES)
        }
    check_launch_reports(reports, expected)
