"""``benchmarks/common.py``: peak-memory and timing helpers measured on cases with known answers."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import common
from common import device_info, peak_memory, timeit_median

MIB = 2**20


def test_cpu_peak_counts_known_allocations_and_frees() -> None:
    def alloc() -> torch.Tensor:
        a = torch.empty(MIB, dtype=torch.uint8)
        b = torch.empty(3 * MIB, dtype=torch.uint8)
        del a
        c = torch.empty(2 * MIB, dtype=torch.uint8)  # peak: b + c = 5 MiB
        del b, c
        return torch.empty(1024, dtype=torch.uint8)

    assert peak_memory(alloc, "cpu") == 5 * MIB
    # Memory held before the call is not counted; repeated measurements agree.
    held = torch.ones(8 * MIB, dtype=torch.uint8)
    assert [peak_memory(alloc, "cpu") for _ in range(2)] == [5 * MIB, 5 * MIB]
    del held


def test_cpu_peak_of_eager_log_softmax_is_its_logits() -> None:
    """Eager ``log_softmax(hidden @ weight.T)`` of N x V fp32 logits holds the logits and the result: 2*N*V*4
    bytes (glibc reuses freed heap pages, so the old RSS probe reported about zero on the second call)."""
    n, v, h = 1024, 4096, 32
    hidden, weight = torch.randn(n, h), torch.randn(v, h)

    def eager() -> torch.Tensor:
        return torch.log_softmax(hidden @ weight.T, dim=-1)

    eager()
    assert [peak_memory(eager, "cpu") for _ in range(3)] == [2 * n * v * 4] * 3


def test_cpu_peak_of_fwd_bwd_includes_the_gradient() -> None:
    leaf = torch.randn(MIB // 4, requires_grad=True)  # 1 MiB of fp32

    def step() -> None:
        leaf.grad = None
        leaf.exp().sum().backward()

    step()
    leaf.grad = None
    peak = peak_memory(step, "cpu")
    assert 2 * MIB <= peak < 2 * MIB + 1024  # exp's saved result and the gradient (plus scalars)
    assert leaf.grad is not None


def test_timeit_median_reports_repeats() -> None:
    calls = []
    stats = timeit_median(lambda: calls.append(1), warmup=2, repeats=5, device="cpu")
    assert len(calls) == 7 and stats["repeats"] == 5 and stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"]


def test_device_info_names_the_cpu_model() -> None:
    """``platform.processor()`` is empty on Linux, so every CPU results file used to say ``cpu``."""
    info = device_info("cpu")
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    if models:
        assert info["device_name"] == models[0]
    assert info["device_name"] and info["torch"] == torch.__version__ and "triton" in info


def test_write_results_records_device_versions_and_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    path = common.write_results("op", {"repeats": 20, "rows": []}, "cpu")
    record = json.loads(path.read_text())
    assert path.name == "op-cpu.json" and record["op"] == "op" and record["repeats"] == 20
    assert record["device_name"] and record["torch"] == torch.__version__ and "triton" in record
    assert datetime.datetime.fromisoformat(record["written_utc"]).tzinfo is not None


def test_results_record_the_baseline_packages_versions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """liger-kernel and cut-cross-entropy versions in every results file, None where not installed."""
    assert common.package_version("torch") == torch.__version__
    assert common.package_version("no-such-distribution-bao-fast") is None
    versions = {"liger-kernel": "0.8.5", "cut-cross-entropy": None}
    monkeypatch.setattr(common, "package_version", versions.get)
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    record = json.loads(common.write_results("op", {"rows": []}, "cpu").read_text())
    assert record["liger_kernel"] == "0.8.5" and "cut_cross_entropy" in record and record["cut_cross_entropy"] is None


def test_quick_results_go_to_their_own_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    assert common.write_results("op", {"rows": []}, "cpu", quick=True) == tmp_path / "quick" / "op-cpu.json"
    assert not (tmp_path / "op-cpu.json").exists()


@pytest.mark.parametrize(
    ("name", "expected"),
    [("NVIDIA H200", 4.8e12), ("NVIDIA H100 80GB HBM3", 3.35e12), ("NVIDIA GH200 480GB", None), ("NVIDIA L4", None)],
)
def test_hbm_bandwidth_by_gpu_name(monkeypatch: pytest.MonkeyPatch, name: str, expected: float | None) -> None:
    """A GH200 (whose name contains "h200") is not taken for an H200: its bandwidth depends on the variant."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert common.hbm_bytes_per_s("cuda") == expected
