"""The benchmark scripts' ``main`` at tiny sizes: flags reach the rows they are meant for, results files
hold what PERF.md asks for. Results go to a temporary directory, never to ``benchmarks/results``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from bao_fast.models import create_tiny_model

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))
import bench_advantages  # noqa: E402
import bench_logprobs  # noqa: E402
import bench_policy_loss  # noqa: E402
import bench_rollout  # noqa: E402
import bench_trainer_step  # noqa: E402
import common  # noqa: E402


@pytest.fixture
def results_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    return tmp_path


def test_advantages_loop_repeats_apply_to_the_loop_only(results_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["bench_advantages.py", "--trajectories", "16", "--turns", "2", "--tokens-per-turn", "8"]
    monkeypatch.setattr(sys, "argv", [*argv, "--repeats", "4", "--loop-repeats", "2"])
    bench_advantages.main()
    record = json.loads((results_dir / "shaped_advantages-cpu.json").read_text())
    repeats = {row["impl"]: row["repeats"] for row in record["results"]}
    assert repeats == {"python-loop": 2, "torch-eager": 4, "bao_fast": 4}
    assert all(row["max_abs_diff"] < 1e-5 and row["peak_mem_MB"] > 0 for row in record["results"])


def test_policy_loss_peak_memory_counts_the_gradient(results_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every fwd+bwd writes a fp32 gradient of T values at least (the RSS probe reported 0.02 MiB for eager's
    at T = 1M, its many T-sized temporaries landing in freed heap pages)."""
    tokens = 1 << 16
    monkeypatch.setattr(sys, "argv", ["bench_policy_loss.py", "--tokens", str(tokens), "--repeats", "2"])
    bench_policy_loss.main()
    record = json.loads((results_dir / "clipped_ratio_loss-cpu.json").read_text())
    assert record["shape"]["tokens"] == tokens and record["repeats"] == 2
    for row in record["results"]:
        assert row["peak_mem_MB"] >= 4 * tokens / 2**20, row
        if row["impl"] == "torch-eager":  # ratio, clipped ratio, two surrogate terms... each 4*T bytes
            assert row["peak_mem_MB"] >= 4 * 4 * tokens / 2**20, row


def test_trainer_packing_rows_record_repeats_and_tensor_peaks(tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(create_tiny_model(tmp_path / "model"), dtype=torch.float32).eval()
    segments = [[("user", list(range(3, 3 + n))), ("assistant", list(range(5, 5 + n)))] for n in (7, 20, 33)]
    rows = bench_trainer_step.packing_vs_padding(model, "test", segments, max_tokens=64, repeats=3)
    assert [row["impl"] for row in rows] == ["padded", "packed"]
    for row in rows:
        assert row["repeats"] == 3 and row["max_abs_diff"] < 1e-4
        assert row["peak_mem_MB"] * 2**20 >= row["target_rows"] * 4  # the log-probs it returns, at least


def test_logprobs_peaks_are_measured_warm_and_in_process() -> None:
    case = bench_logprobs.Case(n=256, h=32, v=2048, dtype="float32", repeats=2)
    device = torch.device("cpu")
    names = ("eager", "bao_fast", "bao_fast_no_entropy")
    impls = {k: v for k, v in bench_logprobs.implementations(device, with_compile=False).items() if k in names}
    eager, fused, fused_no_entropy = bench_logprobs.bench_case(case, device, impls)
    logits = case.n * case.v * 4
    assert eager["peak_mem_mb"] * 2**20 >= 3 * logits  # logits, log-softmax and its exp at least
    for row in (fused, fused_no_entropy):
        assert row["mem_vs_eager"] < 1 and row["logp_max_err"] < 1e-5


def test_logprobs_checks_the_gradients_of_every_implementation() -> None:
    """A baseline with right values and wrong gradients (as liger's reduction="none" path scales every row by
    the first upstream gradient) is caught: each row reports its gradients' error against fp64."""

    def half_gradient(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> bench_logprobs.Outputs:
        logp, _ = bench_logprobs.eager(hidden, weight, targets)
        return 0.5 * logp + 0.5 * logp.detach(), None

    case = bench_logprobs.Case(n=128, h=16, v=512, dtype="float32", repeats=1)
    impls = {"eager": (bench_logprobs.eager, ""), "bao_fast_no_entropy": (bench_logprobs.fused(False), ""),
             "half_gradient": (half_gradient, "")}
    eager, fused, wrong = bench_logprobs.bench_case(case, torch.device("cpu"), impls)
    for row in (eager, fused):
        assert row["dhidden_rel_err"] < 1e-5 and row["dweight_rel_err"] < 1e-5, row
    assert wrong["logp_max_err"] < 1e-5
    assert abs(wrong["dhidden_rel_err"] - 0.5) < 1e-3 and abs(wrong["dweight_rel_err"] - 0.5) < 1e-3


def test_logprobs_repeats_flag_is_honoured() -> None:
    """The CPU headline shape defaults to 3 repeats, but an explicit ``--repeats`` is not capped."""
    assert [c.repeats for c in bench_logprobs.presets("cpu", None, quick=False)] == [3, 20, 20, 20, 20]
    assert {c.repeats for c in bench_logprobs.presets("cpu", 25, quick=False)} == {25}
    assert {c.repeats for c in bench_logprobs.presets("gpu", None, quick=False)} == {20}


def test_rollout_rows_report_peak_memory(results_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["bench_rollout.py", "--engines", "hf", "--tasks", "1", "--group-size", "2", "--max-turns", "2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--max-tokens", "4", "--repeats", "2", "--no-sequential"])
    bench_rollout.main()
    (row,) = json.loads((results_dir / "rollout-cpu.json").read_text())["rows"]
    assert row["engine"] == "hf" and row["repeats"] == 2 and row["peak_mem_MB"] > 0
