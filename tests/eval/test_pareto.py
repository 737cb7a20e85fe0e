"""Pareto frontier on (Score ↑, UR ↓): known fronts, brute-force agreement, loading, CLI outputs."""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bao_fast.cli import RunError, UsageError
from bao_fast.eval import pareto, sweep
from bao_fast.eval.pareto import ParetoPoint, load_point, load_summary, pareto_front, point_from_summary, write_outputs


def _cli(argv: list[str]) -> int:
    """``bao-fast pareto ARGV`` through the module's own parser (the dispatcher is tested in tests/test_cli.py)."""
    parser = argparse.ArgumentParser()
    pareto.add_arguments(parser)
    return pareto.run(parser.parse_args(argv))


def _pt(label: str, score: float, ur: float, **kw) -> ParetoPoint:
    return ParetoPoint(label=label, score=score, ur=ur, **kw)


def _brute_force(points: list[ParetoPoint]) -> set[int]:
    def dominates(q: ParetoPoint, p: ParetoPoint) -> bool:
        return q.score >= p.score and q.ur <= p.ur and (q.score > p.score or q.ur < p.ur)

    return {i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)}


def test_front_of_the_papers_function_gym_points() -> None:
    # BAO.md: BAO 0.692/0.215, UserRL 0.526/0.376, BAO w/o regularisation 0.718/0.906, GPT-4o 0.141 (UR made up).
    points = [
        _pt("bao", 0.692, 0.215),
        _pt("userrl", 0.526, 0.376),
        _pt("bao-noreg", 0.718, 0.906),
        _pt("gpt-4o", 0.141, 0.5),
    ]
    front = pareto_front(points)
    assert [points[i].label for i in front] == ["bao", "bao-noreg"]


def test_front_keeps_duplicates_and_drops_ties_with_higher_ur() -> None:
    points = [_pt("a", 0.5, 0.2), _pt("b", 0.5, 0.2), _pt("c", 0.5, 0.3), _pt("d", 0.4, 0.2), _pt("e", 0.9, 0.9)]
    assert sorted(points[i].label for i in pareto_front(points)) == ["a", "b", "e"]


def test_front_is_ordered_by_ur_and_empty_input_gives_empty_front() -> None:
    points = [_pt("hi", 0.9, 0.8), _pt("lo", 0.1, 0.0), _pt("mid", 0.5, 0.4)]
    assert [points[i].label for i in pareto_front(points)] == ["lo", "mid", "hi"]
    assert pareto_front([]) == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=25))
def test_front_matches_brute_force(grid_points: list[tuple[int, int]]) -> None:
    # coarse integer grid -> many exact ties, the hard case for a sweep
    points = [_pt(str(i), s / 6, u / 6) for i, (s, u) in enumerate(grid_points)]
    front = pareto_front(points)
    assert len(front) == len(set(front))
    assert set(front) == _brute_force(points)


def test_non_finite_point_is_rejected() -> None:
    with pytest.raises(ValueError, match="score"):
        _pt("x", math.nan, 0.1)
    with pytest.raises(ValueError, match="ur"):
        _pt("x", 0.1, math.inf)


def _summary(score: float, ur: float, k: int = 9) -> dict:
    rng = random.Random(int(score * 1000))
    curve = [*sorted(rng.uniform(0, score) for _ in range(k - 1)), score]
    return {
        "score": score,
        "score_ci": [score - 0.1, score + 0.1],
        "ur": ur,
        "ur_ci": [ur - 0.05, ur + 0.05],
        "pass_at_u": {str(i + 1): v for i, v in enumerate(curve)},
        "turns": 4.5,
        "num_episodes": 78,
    }


def test_point_from_summary_reads_curve_in_k_order_and_cis() -> None:
    s = _summary(0.6, 0.3)
    s["pass_at_u"] = {str(k): k / 100 for k in (10, 2, 1, 3, 4, 5, 6, 7, 8, 9)}  # numeric order, not lexical
    p = point_from_summary(s, "run")
    assert p.pass_at_u == tuple(k / 100 for k in range(1, 11))
    assert p.score_ci == pytest.approx((0.5, 0.7)) and p.ur_ci == pytest.approx((0.25, 0.35))
    with pytest.raises(ValueError, match="'ur'"):
        point_from_summary({"score": 0.1}, "run")


def test_load_point_from_file_dir_and_run_dir(tmp_path: Path) -> None:
    (tmp_path / "eval-a").mkdir()
    (tmp_path / "eval-a" / "summary.json").write_text(json.dumps(_summary(0.4, 0.2)))
    run = tmp_path / "run-b" / "eval" / "step_4"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps(_summary(0.7, 0.5)))
    assert load_point(str(tmp_path / "eval-a" / "summary.json")).label == "eval-a"
    assert load_point(str(tmp_path / "eval-a")).score == pytest.approx(0.4)
    named = load_point(f"best={tmp_path / 'run-b'}")
    assert (named.label, named.score) == ("best", pytest.approx(0.7))
    assert load_summary(tmp_path / "run-b")[1] == run / "summary.json"
    # a training run: the last entry of evals.json (the trainer's final evaluation)
    (tmp_path / "run-c").mkdir()
    evals = [{"step": 0, **_summary(0.1, 0.9)}, {"step": 10, **_summary(0.8, 0.3)}]
    (tmp_path / "run-c" / "evals.json").write_text(json.dumps(evals))
    trained = load_point(str(tmp_path / "run-c"))
    assert (trained.label, trained.score, trained.ur) == ("run-c", pytest.approx(0.8), pytest.approx(0.3))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no summary\.json or evals\.json"):
        load_summary(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_summary(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not a JSON evaluation summary"),
        ('{"score": "abc", "ur": 0.1}', "'score' must be a finite number, got 'abc'"),
        ('{"score": null, "ur": 0.1}', "'score' must be a finite number, got None"),
        ('{"score": NaN, "ur": 0.1}', "'score' must be a finite number, got nan"),
        ('{"score": 0.5, "ur": 0.1, "pass_at_u": {"a": 1}}', "'pass_at_u' keys must be k = 1, 2, ..."),
        ('{"score": 0.5, "ur": 0.1, "pass_at_u": {"1": 0.1, "3": 0.4}}', "K without gaps, got ['1', '3']"),
        ('{"score": 0.5, "ur": 0.1, "pass_at_u": {"0": 0.1, "1": 0.4}}', "K without gaps"),
        ('{"score": 0.5, "ur": 0.1, "pass_at_u": {"1": 0.1, "\u00b2": 0.4}}', "K without gaps"),
        ('{"score": 0.5, "ur": 0.1, "pass_at_u": 3}', "'pass_at_u' must map k to Pass@U-k"),
        ('{"score": 0.5, "ur": 0.1, "score_ci": ["a", 1]}', "'score_ci' must be a finite number"),
        ('{"score": 0.5, "ur": 0.1, "turns": "many"}', "'turns' must be a finite number"),
    ],
)
def test_malformed_summary_is_a_usage_error_naming_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    """A file that is not an evaluation summary is the user's input, not a bug: one line, exit status 2."""
    path = tmp_path / "summary.json"
    path.write_text(text)
    with pytest.raises(UsageError, match=re.escape(message)) as exc:
        load_point(str(path))
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("flags", [["--dry-run"], ["--set", "train.steps=1"], ["--grid", "algo.name=bao,grpo"]])
def test_sweep_flags_without_sweep_are_rejected(tmp_path: Path, flags: list[str]) -> None:
    """--dry-run / --set / --grid only act on a sweep; alone they would be silently ignored (no output)."""
    (tmp_path / "summary.json").write_text(json.dumps(_summary(0.4, 0.2)))
    with pytest.raises(UsageError, match=f"{flags[0]} needs --sweep"):
        _cli([str(tmp_path), "--out", str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out").exists()


def test_write_outputs_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:

    specs = []
    for name, score, ur in [("bao", 0.69, 0.21), ("userrl", 0.53, 0.38), ("noreg", 0.72, 0.91), ("sft", 0.3, 0.6)]:
        d = tmp_path / name
        d.mkdir()
        (d / "summary.json").write_text(json.dumps(_summary(score, ur)))
        specs.append(str(d))
    out = tmp_path / "out"
    assert _cli([*specs, "--out", str(out)]) == 0
    for f in ["pareto.png", "pareto.svg", "pass_at_u.png", "pass_at_u.svg", "pareto.md", "pareto.json"]:
        assert (out / f).stat().st_size > 0, f
    data = json.loads((out / "pareto.json").read_text())
    assert data["front"] == ["bao", "noreg"]
    assert "| ★ | bao |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="duplicate labels"):
        write_outputs([_pt("x", 0.1, 0.1), _pt("x", 0.2, 0.2)], tmp_path / "dup")


# -------------------------------------------------------------------------------------------------- sweep


def test_sweep_label_clash_is_refused_before_any_run_trains(tmp_path: Path, monkeypatch) -> None:
    """An input labelled like a sweep run (an older sweep's summary) must fail now, not after hours of training."""
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  tiny: true\ntrain:\n  steps: 2\n")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "summary.json").write_text(json.dumps({**_summary(0.4, 0.2), "label": "name=bao"}))
    monkeypatch.setattr(sweep, "execute", lambda runs: pytest.fail("a sweep run started"))
    with pytest.raises(UsageError, match=re.escape("duplicate labels ['name=bao']")):
        _cli([str(tmp_path / "old"), "--sweep", str(base), "--grid", "algo.name=bao,grpo", "--out", str(tmp_path)])


def test_sweep_plan_is_the_grid_product_with_validated_configs(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  tiny: true\ntrain:\n  steps: 2\n")
    grid = sweep.parse_grid(["algo.shaping.info_seeking_coef=0,0.005,0.05", "algo.name=bao,grpo"])
    assert grid == [("algo.shaping.info_seeking_coef", ["0", "0.005", "0.05"]), ("algo.name", ["bao", "grpo"])]
    runs = sweep.plan(base, grid, tmp_path / "runs", ["train.steps=1"])
    assert len(runs) == 6 and len({r.run_dir for r in runs}) == 6
    first = runs[0]
    assert first.label == "info_seeking_coef=0,name=bao"
    assert first.command[1:6] == ("-m", "bao_fast.cli", "train", "--config", str(base))
    assert first.overrides == (
        "train.steps=1",
        "algo.shaping.info_seeking_coef=0",
        "algo.name=bao",
        f"run_dir={first.run_dir}",
    )
    with pytest.raises(ValueError, match=r"unknown config key 'algo\.shaping\.nope'"):
        sweep.plan(base, sweep.parse_grid(["algo.shaping.nope=1,2"]), tmp_path / "runs")
    for bad_grid, common in ((sweep.parse_grid(["run_dir=a,b"]), []), (grid, ["run_dir=mine"])):
        with pytest.raises(ValueError, match="run_dir: each sweep run gets its own directory"):
            sweep.plan(base, bad_grid, tmp_path / "runs", common)
    for bad in (["novalue"], ["a.b="], ["a=1", "a=2"]):
        with pytest.raises(ValueError, match="grid"):
            sweep.parse_grid(bad)


def test_sweep_execute_runs_commands_in_order_and_stops_on_failure(tmp_path: Path) -> None:
    write_evals = (
        "import json, pathlib, sys; d = pathlib.Path(sys.argv[1]); d.mkdir(parents=True); "
        "(d / 'evals.json').write_text(json.dumps([{'step': 1, 'score': float(sys.argv[2]), 'ur': 0.5}]))"
    )
    runs = [
        sweep.SweepRun(
            f"r{i}", tmp_path / f"r{i}", (), (sys.executable, "-c", write_evals, str(tmp_path / f"r{i}"), str(i / 10))
        )
        for i in range(2)
    ]
    done = list(sweep.execute(runs))
    assert [r.label for r, _ in done] == ["r0", "r1"]
    assert [load_point(f"{r.label}={d}").score for r, d in done] == [0.0, pytest.approx(0.1)]
    failing = [sweep.SweepRun("bad", tmp_path / "bad", (), (sys.executable, "-c", "raise SystemExit(4)"))]
    with pytest.raises(RunError, match="'bad' failed with exit code 4"):  # one line and exit status 1, no traceback
        list(sweep.execute(failing))


def test_pareto_sweep_dry_run_prints_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  tiny: true\n")
    assert _cli(["--sweep", str(base), "--grid", "algo.name=bao,userrl,grpo", "--out", str(tmp_path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all("train --config" in line for line in lines)
    assert [line.split("algo.name=")[1].split()[0] for line in lines] == ["bao", "userrl", "grpo"]


def test_pareto_sweep_adds_each_runs_final_eval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  tiny: true\n")

    def fake_execute(runs: list[sweep.SweepRun]):  # what `bao-fast train` leaves behind: <run_dir>/evals.json
        for i, r in enumerate(runs):
            r.run_dir.mkdir(parents=True)
            evals = [{"step": 0, **_summary(0.05, 0.9)}, {"step": 4, **_summary(0.3 + 0.2 * i, 0.6 - 0.2 * i)}]
            (r.run_dir / "evals.json").write_text(json.dumps(evals))
            yield r, r.run_dir

    monkeypatch.setattr(sweep, "execute", fake_execute)
    out = tmp_path / "out"
    assert _cli(["--sweep", str(base), "--grid", "algo.shaping.info_seeking_coef=0,0.05", "--out", str(out)]) == 0
    data = json.loads((out / "pareto.json").read_text())
    assert [p["label"] for p in data["points"]] == ["info_seeking_coef=0", "info_seeking_coef=0.05"]
    assert [p["score"] for p in data["points"]] == [pytest.approx(0.3), pytest.approx(0.5)]
    assert data["front"] == ["info_seeking_coef=0.05"]
