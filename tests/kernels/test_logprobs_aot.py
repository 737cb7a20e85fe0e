"""The log-prob kernels compile for Ampere and Hopper without a GPU (the interpreter accepts code the JIT
rejects), with the tiles a launch would pick, for bf16/fp16/fp32 and with feature flags off and on: no register
spills, shared memory within the per-block limit, and the 16-bit main loops become tensor-core MMAs (wgmma on
sm_90, mma.sync on sm_80) fed by asynchronous copies."""

from __future__ import annotations

import itertools

from bao_fast.kernels.aot import KernelReport

GEMM_KERNELS = ("fwd", "dlogits", "dw", "dh")


def test_every_kernel_compiles_without_spills_for_sm80_and_sm90(run_aot) -> None:
    reports = run_aot("logprobs_aot", "--arch", "80", "90", "--workers", "2", tools=("ptxas", "cuobjdump"))

    kernels = (*GEMM_KERNELS, "combine")
    expected = {
        f"sm{arch}/{dtype}/{kernel}:flags={flags}"
        for arch, dtype, kernel, flags in itertools.product(
            (80, 90), ("bfloat16", "float16", "float32"), kernels, ("off", "on")
        )
    }
    assert set(reports) == expected, sorted(set(reports) ^ expected)
    for name, fields in reports.items():
        report = KernelReport(**fields)
        arch, dtype, kernel = int(name[2:4]), name.split("/")[1], name.split("/")[2].split(":")[0]
        assert report.registers > 0, name
        assert report.problems(arch) == [], f"{name}: {report.problems(arch)}"
        if kernel in GEMM_KERNELS:
            assert report.cp_async > 0, f"{name}: loads are not pipelined"
            if dtype != "float32":
                mma = report.wgmma if arch == 90 else report.mma_sync
                assert mma > 0, f"{name}: no tensor-core MMA in the PTX"
