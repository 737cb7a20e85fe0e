"""``bao-fast bench``: report rendering from sample results JSON, script discovery and the runner."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bao_fast import cli
from bao_fast.eval import bench
from bao_fast.eval.bench import discover, load_results, run_script
from bao_fast.eval.report import benchmark_report, case_table, split_cases


def _cli(argv: list[str]) -> int:
    """``bao-fast bench ARGV`` through the module's own parser (the dispatcher is tested in tests/test_cli.py)."""
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return bench.run(parser.parse_args(argv))


DEVICE = {
    "device": "cuda:0",
    "device_name": "NVIDIA H100 80GB HBM3",
    "cpu_threads": 16,
    "cpu_count": 32,
    "torch": "2.13.0",
    "cuda": "12.8",
    "python": "3.11.7",
    "triton": "3.9.0",
}


def _write(results: Path, name: str, record: dict) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / name).write_text(json.dumps(record))


def _samples(results: Path) -> None:
    """Three payload styles the op benchmarks use: per-row shapes, a record-wide shape, a phase breakdown."""
    _write(
        results,
        "logprobs-gpu.json",
        {
            "op": "logprobs",
            **DEVICE,
            "preset": "gpu",
            "results": [
                {
                    "impl": "eager",
                    "n": 4096,
                    "h": 512,
                    "v": 1000,
                    "dtype": "bf16",
                    "repeats": 20,
                    "median_ms": 12.0,
                    "peak_mem_mb": 300.0,
                    "tflops": 1.5,
                    "logp_max_err": 1e-3,
                },
                {
                    "impl": "bao_fast",
                    "n": 4096,
                    "h": 512,
                    "v": 1000,
                    "dtype": "bf16",
                    "repeats": 20,
                    "median_ms": 3.0,
                    "peak_mem_mb": 6.0,
                    "tflops": 6.0,
                    "logp_max_err": 2e-3,
                    "speedup_vs_eager": 4.0,
                },
                {
                    "impl": "liger",
                    "n": 4096,
                    "h": 512,
                    "v": 1000,
                    "dtype": "bf16",
                    "skipped": "liger-kernel not installed",
                },
                {"impl": "eager", "n": 64, "h": 32, "v": 77, "dtype": "bf16", "repeats": 20, "median_ms": 0.5},
                {"impl": "bao_fast", "n": 64, "h": 32, "v": 77, "dtype": "bf16", "repeats": 20, "median_ms": 0.25},
            ],
        },
    )
    _write(
        results,
        "pack_multiturn-cpu.json",
        {
            "op": "pack_multiturn",
            **DEVICE,
            "device": "cpu",
            "device_name": "cpu",
            "cuda": None,
            "shape": {"trajectories": 1024, "turns": 16},
            "dtype": "int64",
            "rows": [
                {"impl": "python reference", "median_ms": 600.0, "peak_extra_bytes": 2 * 2**20},
                {"impl": "C++", "median_ms": 20.0, "peak_extra_bytes": 2**20},
            ],
        },
    )
    _write(
        results,
        "trainer_step-cpu.json",
        {
            "op": "trainer_step",
            **DEVICE,
            "device": "cpu",
            "phases": [
                {"phase": "generate", "median_ms": 750.0, "share": 0.75},
                {"phase": "loss+backward", "median_ms": 250.0, "share": 0.25},
            ],
            "tokens_per_s": 1234.5,
            "results": [{"impl": "padded", "median_ms": 9.0}, {"impl": "packed", "median_ms": 6.0}],
        },
    )


def test_report_renders_ratios_memory_versions_and_skips(tmp_path: Path) -> None:
    _samples(tmp_path)
    report = benchmark_report(load_results(tmp_path))
    # index and versions
    assert "| logprobs | NVIDIA H100 80GB HBM3 | 2.13.0 | 3.9.0 | `logprobs-gpu.json` |" in report
    assert "torch 2.13.0, triton 3.9.0, CUDA 12.8" in report
    # one table per shape, ratios = baseline median / row median
    assert "Shape n=4096, h=512, v=1000, dtype=bf16:" in report and "Shape n=64, h=32, v=77, dtype=bf16:" in report
    assert "| bao_fast | 3 | 4.00 | 1 | 6 | 6 | 0.002 |" in report
    assert "| bao_fast | 0.25 | 2.00 | 1 | – |" in report
    assert "| liger | skipped: liger-kernel not installed |" in report
    # record-wide shape, bytes -> MiB, and the ratio against the reference
    assert "- shape: trajectories=1024, turns=16" in report
    assert "| C++ | 20 | 30.00 | 1 | 1 |" in report and "| python reference | 600 | 1 | 0.03 | 2 |" in report
    # trainer step breakdown
    assert "| generate | 750 | 75.0% |" in report and "- tokens_per_s: 1234" in report
    assert "| packed | 6 | 1.50 | 1 | – |" in report


def test_case_table_keeps_row_order_and_header() -> None:
    heading, table = case_table([{"impl": "a", "median_ms": 2.0}, {"impl": "b", "median_ms": 1.0, "GB_per_s": 3.25}])
    assert heading == ""
    lines = table.splitlines()
    assert lines[0] == "| impl | median ms | × a | × b | peak MiB | GB_per_s |"
    assert lines[2] == "| a | 2 | 1 | 0.50 | – | – |" and lines[3] == "| b | 1 | 2.00 | 1 | – | 3.25 |"


def test_cases_differing_by_a_flag_or_a_float_are_separate_tables() -> None:
    """Ratios compare rows of one case only: a bool parameter is a shape field, and rows that only a float
    parameter tells apart split where an implementation repeats."""
    times = {("eager", True): 10.0, ("eager", False): 8.0, ("fused", True): 5.0, ("fused", False): 4.0}
    rows = [{"impl": impl, "n": 8, "causal": causal, "median_ms": ms} for (impl, causal), ms in times.items()]
    cases = split_cases(rows)
    assert [[(r["impl"], r["causal"]) for r in case] for case in cases] == [
        [("eager", True), ("fused", True)], [("eager", False), ("fused", False)]
    ]
    heading, table = case_table(cases[0])
    assert heading == "n=8, causal=True" and "| eager | 10 | 1 | 0.50 |" in table
    by_float = [{"impl": i, "sparsity": sp, "median_ms": ms}
                for sp, (e, f) in ((0.5, (10.0, 5.0)), (0.9, (8.0, 2.0))) for i, ms in (("eager", e), ("fused", f))]
    assert [[r["median_ms"] for r in case] for case in split_cases(by_float)] == [[10.0, 5.0], [8.0, 2.0]]


def test_bad_results_are_rejected(tmp_path: Path) -> None:
    _write(tmp_path, "x-cpu.json", {"op": "x", "numbers": [1, 2]})
    with pytest.raises(ValueError, match=r"x-cpu\.json: no per-implementation rows"):
        benchmark_report(load_results(tmp_path))
    (tmp_path / "broken-cpu.json").write_text("{")
    with pytest.raises(ValueError, match=r"broken-cpu\.json: not valid JSON"):
        load_results(tmp_path)
    with pytest.raises(ValueError, match="records"):
        benchmark_report([])


FAKE_BENCH = """
import argparse, json, pathlib, sys
parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true")
args = parser.parse_args()
out = pathlib.Path(__file__).parent / "results" / "fake-cpu.json"
out.parent.mkdir(exist_ok=True)
out.write_text(json.dumps({"op": "fake", "device": "cpu", "quick": args.quick,
                           "rows": [{"impl": "base", "median_ms": 4.0}, {"impl": "fast", "median_ms": 1.0}]}))
"""


def test_bench_cli_runs_scripts_and_writes_report(tmp_path: Path) -> None:
    bench_dir = tmp_path / "benchmarks"
    bench_dir.mkdir()
    (bench_dir / "bench_fake.py").write_text(FAKE_BENCH)
    (bench_dir / "bench_noquick.py").write_text("import sys; sys.exit(3 if len(sys.argv) > 1 else 0)\n")
    (bench_dir / "common.py").write_text("")
    assert [s.name for s in discover(bench_dir)] == ["bench_fake.py", "bench_noquick.py"]
    assert [s.name for s in discover(bench_dir, ["fake"])] == ["bench_fake.py"]
    with pytest.raises(ValueError, match="--only"):
        discover(bench_dir, ["nothing"])
    assert _cli(["--bench-dir", str(bench_dir), "--quick"]) == 0  # --quick only where declared
    assert json.loads((bench_dir / "results" / "fake-cpu.json").read_text())["quick"] is True
    report = (bench_dir / "results" / "REPORT.md").read_text()
    assert "## fake on cpu" in report and "| fast | 1 | 4.00 | 1 | – |" in report


def test_report_leaves_out_quick_results(tmp_path: Path) -> None:
    """``--quick`` smoke runs write to results/quick/: the report renders the full-size results only."""
    _samples(tmp_path)
    _write(tmp_path / "quick", "logprobs-gpu.json", {"op": "logprobs", **DEVICE, "results": [{"impl": "smoke"}]})
    records = load_results(tmp_path)
    assert [r["_file"] for r in records] == ["logprobs-gpu.json", "pack_multiturn-cpu.json", "trainer_step-cpu.json"]
    assert "smoke" not in benchmark_report(records)


def test_failing_script_fails_the_run(tmp_path: Path) -> None:
    bench_dir = tmp_path / "benchmarks"
    bench_dir.mkdir()
    (bench_dir / "bench_bad.py").write_text("raise SystemExit(5)\n")
    assert run_script(bench_dir / "bench_bad.py", quick=False, timeout=60).returncode == 5
    _write(bench_dir / "results", "old-cpu.json", {"op": "old", "rows": [{"impl": "a", "median_ms": 1.0}]})
    assert _cli(["--bench-dir", str(bench_dir)]) == 1
    assert (bench_dir / "results" / "REPORT.md").exists()  # the report is still rendered
    (bench_dir / "bench_sleep.py").write_text("import time\ntime.sleep(30)\n")
    assert run_script(bench_dir / "bench_sleep.py", quick=False, timeout=0.5).returncode == -1


def test_bench_cli_errors_are_one_line_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench_dir = tmp_path / "benchmarks"
    cases = [
        (["--report-only", "--only", "fake"], "--report-only runs nothing"),
        (["--report-only"], "is not a directory"),  # no --bench-dir there
    ]
    for argv, message in cases:
        assert cli.main(["bench", "--bench-dir", str(bench_dir), *argv]) == 2
        assert message in capsys.readouterr().err
    _write(bench_dir / "results", "x-cpu.json", {"op": "x", "numbers": [1, 2]})
    assert cli.main(["bench", "--bench-dir", str(bench_dir), "--report-only"]) == 2
    assert "x-cpu.json: no per-implementation rows" in capsys.readouterr().err
    (bench_dir / "results" / "x-cpu.json").write_text("{")
    assert cli.main(["bench", "--bench-dir", str(bench_dir), "--report-only"]) == 2
    assert "x-cpu.json: not valid JSON" in capsys.readouterr().err


def test_every_committed_result_is_rendered() -> None:
    """Each ``benchmarks/results/*.json`` gets an index line and a section with its rows and device."""
    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    records = load_results(results)
    assert records
    report = benchmark_report(records)
    for record in records:
        assert f"`{record['_file']}` |" in report
        assert f"## {record['op']} on " in report
        for key in ("torch", "device_name"):
            assert key in record, (record["_file"], key)


def test_ratios_other_than_speed_ups_are_reported() -> None:
    """mem_vs_eager is PERF.md's CPU memory target and max_abs_diff_vs_padded a correctness figure: shown."""
    rows = [
        {"impl": "eager", "median_ms": 4.0, "speedup_vs_eager": 1.0, "mem_vs_eager": 1.0},
        {"impl": "fast", "median_ms": 2.0, "speedup_vs_eager": 2.0, "mem_vs_eager": 0.02,
         "max_abs_diff_vs_padded": 0.5},
    ]
    _, table = case_table(rows)
    header = table.splitlines()[0]
    assert "mem_vs_eager" in header and "max_abs_diff_vs_padded" in header and "speedup" not in header
