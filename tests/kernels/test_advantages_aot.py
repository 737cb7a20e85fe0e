"""The shaped-advantage kernels compile for Ampere and Hopper without a GPU (the interpreter accepts code the
JIT rejects), for every configuration the launcher can meet, within shared memory and without spills."""

from __future__ import annotations

import itertools

from bao_fast.kernels.aot import KernelReport

from bao_fast.algo.shaping import TRAJECTORY_SCORES, TURN_CREDITS


def test_every_launch_compiles_for_sm80_and_sm90(run_aot) -> None:
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
    assert expected <= set(reports), sorted(expected - set(reports))
    assert any(name.endswith("ints=one") for name in reports)
    for name, fields in reports.items():
        report = KernelReport(**fields)
        assert report.registers > 0, name
        assert report.problems(int(name[2:4])) == [], name
