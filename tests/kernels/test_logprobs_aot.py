"""The log-prob kernels compile for Hopper without a GPU (the interpreter accepts code the JIT rejects), and
their main loops become wgmma tensor-core MMAs fed by asynchronous copies, in shared memory that fits."""

from __future__ import annotations

H100_SHARED_BYTES = 227 * 1024


def test_kernels_compile_for_sm90_with_tensor_cores(run_aot) -> None:
    reports = run_aot("logprobs_aot", "--arch", "90", "--dtype", "bfloat16")
    assert set(reports) == {"fwd", "combine", "dlogits", "dw", "dh"}
    for name in ("fwd", "dlogits", "dw", "dh"):
        report = reports[name]
        assert report["wgmma"] > 0, f"{name}: no wgmma in the PTX"
        assert report["cp_async"] > 0, f"{name}: loads are not pipelined"
        assert 0 < report["shared_bytes"] <= H100_SHARED_BYTES, f"{name}: {report['shared_bytes']} B shared"
