"""The benchmark scripts' ``main`` at tiny sizes: flags reach the rows they are meant for, results files
hold what PERF.md asks for. Results go to a temporary directory, never to ``benchmarks/results``."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from bao_fast.models import create_tiny_model, load_tokenizer

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))
import bench_advantages  # noqa: E402
import bench_logprobs  # noqa: E402
import bench_packing  # noqa: E402
import bench_policy_loss  # noqa: E402
import bench_rollout  # noqa: E402
import bench_trainer_step  # noqa: E402
import common  # noqa: E402


@pytest.fixture
def results_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    return tmp_path


NO_VLLM = "vLLM is not installed here (test)"


def test_advantages_loop_repeats_apply_to_the_loop_only(results_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["bench_advantages.py", "--trajectories", "16", "--turns", "2", "--tokens-per-turn", "8"]
    monkeypatch.setattr(sys, "argv", [*argv, "--repeats", "4", "--loop-repeats", "2"])
    bench_advantages.main()
    record = json.loads((results_dir / "shaped_advantages-cpu.json").read_text())
    repeats = {row["impl"]: row["repeats"] for row in record["results"]}
    assert repeats == {"python-loop": 2, "torch-eager": 4, "bao_fast": 4}
    assert all(row["max_abs_diff"] < 1e-5 and row["peak_mem_MB"] > 0 for row in record["results"])


def test_advantages_batch_has_exactly_the_requested_shape(results_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PERF.md's batch is trajectories x turns x tokens exactly (4096 x 16 x 512 = 65,536 turns, 33.5M tokens);
    every turn opens with untrained observation tokens (64, or half of a short turn)."""
    (rewards, _, offsets, _, token_turns), spans = bench_advantages.make_batch(8, 3, 160, torch.device("cpu"))
    assert rewards.numel() == 24 and offsets.tolist() == list(range(0, 25, 3)) and spans[-1] == 24 * 160
    per_turn = token_turns.view(24, 160)
    assert (per_turn[:, :64] == -1).all() and (per_turn[:, 64:] == torch.arange(24)[:, None]).all()
    argv = ["bench_advantages.py", "--trajectories", "16", "--turns", "2", "--tokens-per-turn", "8", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--loop-repeats", "1"])
    bench_advantages.main()
    shape = json.loads((results_dir / "shaped_advantages-cpu.json").read_text())["shape"]
    assert shape["turns"] == 32 and shape["tokens"] == 256
    assert shape["turns_per_trajectory"] == 2 and shape["tokens_per_turn"] == 8
    assert shape["observation_tokens_per_turn"] == 4


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


def test_policy_loss_peak_is_measured_without_the_timed_runs_gradient(
    results_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA the peak counts from the allocation at its start: a gradient the timed runs left in ``.grad`` is
    in that base and the measured step's new one cancels it (4*T bytes too low). The CPU probe does not see
    it, so the test checks what the measured step starts from."""
    grads_held = []

    def spy(step, device):
        leaf = dict(zip(step.__code__.co_freevars, step.__closure__, strict=True))["leaf"].cell_contents
        grads_held.append(leaf.grad)
        return common.peak_memory(step, device)

    monkeypatch.setattr(bench_policy_loss, "peak_memory", spy)
    monkeypatch.setattr(sys, "argv", ["bench_policy_loss.py", "--tokens", "4096", "--repeats", "1"])
    bench_policy_loss.main()
    assert len(grads_held) == 8 and all(grad is None for grad in grads_held)


def test_trainer_default_engine_leaves_out_a_missing_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    assert bench_trainer_step.default_engine(on_gpu=False) == ("hf", None)
    monkeypatch.setattr(bench_trainer_step, "missing_engine", lambda kind: None)
    assert bench_trainer_step.default_engine(on_gpu=True) == ("vllm", None)
    monkeypatch.setattr(bench_trainer_step, "missing_engine", lambda kind: NO_VLLM if kind == "vllm" else None)
    assert bench_trainer_step.default_engine(on_gpu=True) == ("hf", NO_VLLM)


def test_trainer_asked_for_a_missing_vllm_exits_naming_the_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench_trainer_step, "missing_engine", lambda kind: NO_VLLM if kind == "vllm" else None)
    monkeypatch.setattr(sys, "argv", ["bench_trainer_step.py", "--engine", "vllm"])
    with pytest.raises(SystemExit) as exc:
        bench_trainer_step.main()
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and f"--engine vllm: {NO_VLLM}" in err


def test_trainer_gpu_model_vocabulary_is_padded(tmp_path: Path) -> None:
    """The GPU model's LM head has Qwen's 151,936 rows (here 4096, on the tiny model); the tokenizer is kept."""
    path = bench_trainer_step.pad_vocab(create_tiny_model(tmp_path / "model"), 4096)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.vocab_size == 4096 and model.get_output_embeddings().weight.shape[0] == 4096
    assert model.get_input_embeddings().weight.shape[0] == 4096 and len(load_tokenizer(path)) == 2048
    assert bench_trainer_step.QWEN_VOCAB_SIZE == 151936


def test_trainer_packing_rows_record_repeats_and_tensor_peaks(tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(create_tiny_model(tmp_path / "model"), dtype=torch.float32).eval()
    segments = [[("user", list(range(3, 3 + n))), ("assistant", list(range(5, 5 + n)))] for n in (7, 20, 33)]
    rows = bench_trainer_step.packing_vs_padding(model, "test", segments, max_tokens=64, repeats=3)
    assert [row["impl"] for row in rows] == ["padded", "packed"]
    for row in rows:
        assert row["repeats"] == 3 and row["max_abs_diff"] < 1e-4
        assert row["peak_mem_MB"] * 2**20 >= row["target_rows"] * 4  # the log-probs it returns, at least


def test_logprobs_peaks_are_measured_warm_and_in_process() -> None:
    """Each fused row below the eager of its own work (the CPU path's chunks are ~16 MiB: larger than the
    logits of a smaller shape)."""
    case = bench_logprobs.Case(n=512, h=32, v=4096, dtype="float32", repeats=2)
    device = torch.device("cpu")
    names = ("eager", "eager_no_entropy", "bao_fast", "bao_fast_no_entropy")
    impls = {k: v for k, v in bench_logprobs.implementations(device, with_compile=False).items() if k in names}
    eager, _, fused, fused_no_entropy = bench_logprobs.bench_case(case, device, impls)
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


def test_logprobs_rows_are_compared_with_the_eager_of_the_same_work() -> None:
    """Rows without entropy (bao_fast_no_entropy, the CE baselines) against eager without entropy; with entropy
    against eager with it; torch.compile without entropy is a baseline too."""
    impls = bench_logprobs.implementations(torch.device("cpu"), with_compile=True)
    assert {"eager_no_entropy", "compile_no_entropy"} <= impls.keys()
    assert impls["compile_no_entropy"][0] is not None
    case = bench_logprobs.Case(n=128, h=16, v=512, dtype="float32", repeats=2)
    names = ("eager", "eager_no_entropy", "bao_fast", "bao_fast_no_entropy")
    rows = {r["impl"]: r for r in bench_logprobs.bench_case(case, torch.device("cpu"), {k: impls[k] for k in names})}
    for name, base in (("bao_fast", "eager"), ("bao_fast_no_entropy", "eager_no_entropy"), ("eager", "eager")):
        row, ref = rows[name], rows[base]
        assert row["baseline"] == base and row["speedup_vs_eager"] == ref["median_ms"] / row["median_ms"]
        assert row["mem_vs_eager"] == row["peak_mem_mb"] / ref["peak_mem_mb"]
    assert rows["eager_no_entropy"]["peak_mem_mb"] < rows["eager"]["peak_mem_mb"]


def test_logprobs_cce_rows_record_the_options_passed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def linear_cross_entropy(hidden, weight, targets, **kwargs):
        calls.append(kwargs)
        return -bench_logprobs.eager_no_entropy(hidden, weight, targets)[0]

    fake = types.SimpleNamespace(linear_cross_entropy=linear_cross_entropy)
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", fake)
    case = bench_logprobs.Case(n=64, h=16, v=256, dtype="float32", repeats=1)
    options = bench_logprobs.cce_options(torch.device("cpu"))
    (row,) = bench_logprobs.bench_case(case, torch.device("cpu"), {"cce": (bench_logprobs.cce(options), "")})
    assert row["cce_options"] == options == {"impl": "torch_compile"} and row["logp_max_err"] < 1e-5
    assert calls and all(kwargs == {"reduction": "none", **options} for kwargs in calls)
    assert bench_logprobs.cce_options(torch.device("cuda")) == {"impl": "cce", "filter_eps": "auto"}


def test_logprobs_results_are_written_after_every_shape(results_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stopped part-way (a GPU session stops a stage after 280 s) keeps the shapes it finished."""
    cases = [bench_logprobs.Case(n=64, h=16, v=v, dtype="float32", repeats=1) for v in (128, 256)]
    monkeypatch.setattr(bench_logprobs, "presets", lambda *args: cases)
    monkeypatch.setattr(bench_logprobs, "implementations", lambda *args, **kw: {"eager": (bench_logprobs.eager, "")})
    bench_case = bench_logprobs.bench_case

    def stop_at_the_second(case, device, impls):
        if case is cases[1]:
            raise KeyboardInterrupt
        return bench_case(case, device, impls)

    monkeypatch.setattr(bench_logprobs, "bench_case", stop_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        bench_logprobs.main([])
    record = json.loads((results_dir / "logprobs-cpu.json").read_text())
    assert record["complete"] is False and [r["v"] for r in record["results"]] == [128]
    monkeypatch.setattr(bench_logprobs, "bench_case", bench_case)
    bench_logprobs.main([])
    record = json.loads((results_dir / "logprobs-cpu.json").read_text())
    assert record["complete"] is True and [r["v"] for r in record["results"]] == [128, 256]


def test_quick_runs_never_overwrite_the_full_results(results_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--quick`` (``bao-fast bench --quick``) writes to results/quick/, which the report leaves out."""
    case = bench_logprobs.Case(n=64, h=16, v=128, dtype="float32", repeats=1)
    monkeypatch.setattr(bench_logprobs, "presets", lambda *args: [case])
    monkeypatch.setattr(bench_logprobs, "implementations", lambda *args, **kw: {"eager": (bench_logprobs.eager, "")})
    bench_logprobs.main(["--quick"])
    argv = ["bench_packing.py", "--quick", "--default-allocator", "--trajectories", "4", "--turns", "2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--repeats", "1", "--warmup", "0"])
    bench_packing.main()
    assert not list(results_dir.glob("*.json"))
    for name in ("logprobs-cpu.json", "pack_multiturn-cpu.json"):
        assert json.loads((results_dir / "quick" / name).read_text())["quick"] is True


def test_logprobs_repeats_flag_is_honoured() -> None:
    """The CPU headline shape defaults to 3 repeats, but an explicit ``--repeats`` is not capped."""
    assert [c.repeats for c in bench_logprobs.presets("cpu", None, quick=False)] == [3, 20, 20, 20, 20]
    assert {c.repeats for c in bench_logprobs.presets("cpu", 25, quick=False)} == {25}
    assert {c.repeats for c in bench_logprobs.presets("gpu", None, quick=False)} == {20}


def test_rollout_default_engines_leave_out_a_missing_vllm(
    results_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run without --engines (as ``bao-fast bench`` does) where vLLM is missing: hf, and a skipped vllm row;
    an explicit --engines vllm is a one-line error naming the flag."""
    monkeypatch.setattr(bench_rollout, "missing_engine", lambda kind: NO_VLLM if kind == "vllm" else None)
    argv = ["bench_rollout.py", "--tasks", "1", "--group-size", "2", "--max-turns", "1", "--max-tokens", "2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--repeats", "1", "--warmup", "0", "--no-sequential"])
    bench_rollout.main()
    record = json.loads((results_dir / "rollout-cpu.json").read_text())
    assert record["complete"] is True
    assert [(r["engine"], r.get("skipped")) for r in record["rows"]] == [("hf", None), ("vllm", NO_VLLM)]
    monkeypatch.setattr(sys, "argv", [*argv, "--engines", "hf,vllm"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        bench_rollout.main()
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and f"--engines vllm: {NO_VLLM}" in err


def test_rollout_keeps_the_rows_of_finished_engines(results_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_engine = bench_rollout.make_engine

    def vllm_fails(name, *args):
        if name == "vllm":
            raise RuntimeError("engine failed to start")
        return make_engine(name, *args)

    monkeypatch.setattr(bench_rollout, "missing_engine", lambda kind: None)
    monkeypatch.setattr(bench_rollout, "make_engine", vllm_fails)
    argv = ["bench_rollout.py", "--tasks", "1", "--group-size", "2", "--max-turns", "1", "--max-tokens", "2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--repeats", "1", "--warmup", "0", "--no-sequential"])
    with pytest.raises(RuntimeError, match="failed to start"):
        bench_rollout.main()
    record = json.loads((results_dir / "rollout-cpu.json").read_text())
    assert record["complete"] is False and [r["engine"] for r in record["rows"]] == ["hf"]


def test_rollout_rows_report_peak_memory(results_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["bench_rollout.py", "--engines", "hf", "--tasks", "1", "--group-size", "2", "--max-turns", "2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--max-tokens", "4", "--repeats", "2", "--no-sequential"])
    bench_rollout.main()
    (row,) = json.loads((results_dir / "rollout-cpu.json").read_text())["rows"]
    assert row["engine"] == "hf" and row["repeats"] == 2 and row["peak_mem_MB"] > 0


def test_rollout_speedups_compare_with_the_same_engines_baselines() -> None:
    rows = [{"engine": "hf", "median_s": 4.0}, {"engine": "hf-sequential", "median_s": 12.0},
            {"engine": "vllm", "median_s": 1.0}, {"engine": "vllm-rounds", "median_s": 1.5},
            {"engine": "vllm-sequential", "median_s": 6.0}, {"engine": "vllm", "skipped": "why"}]
    bench_rollout.add_speedups(rows)
    assert [r.get("speedup_vs_sequential") for r in rows] == [3.0, 1.0, 6.0, 4.0, 1.0, None]
    assert [r.get("speedup_vs_rounds") for r in rows] == [None, None, 1.5, None, None, None]


def test_rollout_reply_latency_is_seeded_per_episode_and_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(bench_rollout.time, "sleep", slept.append)
    for task in (5, 6):
        gym = bench_rollout.ReplyGym(max_turns=3, latency_s=0.02, episode=9)
        gym.reset(task, 0)
        for _ in range(3):
            gym.step("x")
    assert slept[:3] == slept[3:] and len(set(slept[:3])) == 3 and all(0.0 <= s <= 0.04 for s in slept)
    gym = bench_rollout.ReplyGym(max_turns=1)
    gym.reset(5, 0)
    gym.step("x")
    assert len(slept) == 6  # no latency: no sleep
    gym = bench_rollout.ReplyGym(max_turns=1, latency_s=0.02, episode=10)
    gym.reset(5, 0)
    gym.step("x")
    assert slept[-1] != slept[0]  # another episode, another latency
