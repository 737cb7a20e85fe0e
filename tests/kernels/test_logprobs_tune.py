"""The tile tuner (``python -m bao_fast.kernels.logprobs_tune``), run on the Triton interpreter with tiny shapes:
it picks the fastest candidate of each knob, never one whose outputs are wrong, and writes a file
``load_tiles`` reads back."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from bao_fast.kernels import logprobs_tune
from bao_fast.kernels.logprobs import logprobs_backward, logprobs_forward
from bao_fast.kernels.logprobs_configs import LogprobTiles, load_tiles, select_tiles
from bao_fast.kernels.logprobs_tune import Problem, candidate_chunk_bytes, candidate_tiles, tune

from bao_fast.ops.reference import token_logprobs_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU tensors: the Triton interpreter
FAST_FWD, FAST_DW = candidate_tiles(torch.float32)[-1], candidate_tiles(torch.float32)[-2]
FAST_CHUNK = candidate_chunk_bytes()[0]


START = select_tiles(DEVICE, torch.float32)


def _problem(dtype: torch.dtype = torch.float32, cls: type[Problem] = Problem) -> Problem:
    return cls.random(37, 40, 101, dtype, DEVICE, seed=3)


def _fake_cost(tiles: LogprobTiles) -> float:
    """A deterministic 'time' that prefers a known option per knob, so the search result is predictable."""
    cost = 0.0
    cost += 0 if tiles.fwd.label() == replace(FAST_FWD, group_m=tiles.fwd.group_m).label() else 1
    cost += 0 if tiles.fwd_split_divisor == 4 else 1
    cost += 0 if tiles.dw.label() == replace(FAST_DW, group_m=tiles.dw.group_m).label() else 1
    cost += 0 if tiles.dw.group_m == 16 else 1
    cost += 0 if tiles.chunk_bytes == FAST_CHUNK else 1
    return cost


def test_descent_picks_the_fastest_option_of_every_knob(monkeypatch) -> None:
    costs: dict[int, float] = {}

    class CostedProblem(Problem):
        """Remembers the cost of the tiles each launch used; the patched timer reads it back."""

        def forward(self, tiles):
            costs[0] = _fake_cost(tiles)
            return super().forward(tiles)

        def backward(self, tiles, entropy, lse):
            costs[0] = _fake_cost(tiles)
            return super().backward(tiles, entropy, lse)

    def fake_time(fn, device, repeats):
        fn()
        return costs[0]

    monkeypatch.setattr(logprobs_tune, "time_ms", fake_time)
    problem = _problem(cls=CostedProblem)
    best, trials = tune(problem, START, repeats=1, kernels=("fwd", "dw"))

    assert best.fwd == replace(FAST_FWD, group_m=START.fwd.group_m) and best.fwd_split_divisor == 4
    assert best.dw == replace(FAST_DW, group_m=16)
    assert best.chunk_bytes == FAST_CHUNK
    assert best.dlogits == START.dlogits and best.dh == START.dh  # not tuned
    knobs = {t.knob for t in trials}
    assert knobs == {"fwd.tile", "fwd.split_divisor", "dw.tile", "dw.group_m", "chunk_bytes"}
    assert len([t for t in trials if t.knob == "fwd.tile"]) == 1 + len(candidate_tiles(torch.float32))
    assert all(t.median_ms is not None and t.error == "" for t in trials)


def test_candidates_with_wrong_outputs_are_rejected(monkeypatch) -> None:
    costs: dict[int, float] = {}

    class BrokenProblem(Problem):
        """With FAST_FWD's tile the forward 'miscompiles' (NaN logp) and would be the fastest."""

        def forward(self, tiles):
            logp, entropy, lse = super().forward(tiles)
            broken = tiles.fwd.label() == replace(FAST_FWD, group_m=tiles.fwd.group_m).label()
            costs[0] = 0.0 if broken else 1.0
            if broken:
                logp = torch.full_like(logp, float("nan"))
            return logp, entropy, lse

    def fake_time(fn, device, repeats):
        fn()
        return costs[0]

    monkeypatch.setattr(logprobs_tune, "time_ms", fake_time)
    problem = _problem(cls=BrokenProblem)
    best, trials = tune(problem, START, repeats=1, kernels=("fwd",))

    label = replace(FAST_FWD, group_m=START.fwd.group_m).label()
    broken = [t for t in trials if t.knob == "fwd.tile" and t.value == label]
    assert broken and all(t.median_ms is None and "differs" in t.error for t in broken)
    assert best.fwd.label() != broken[0].value


def test_tuned_tiles_match_the_fp64_reference() -> None:
    problem = _problem(torch.bfloat16)
    best, trials = tune(problem, START, repeats=1)
    assert {t.knob for t in trials} >= {"fwd.tile", "dlogits.tile", "dw.tile", "dh.tile", "chunk_bytes"}
    assert any(t.median_ms is not None for t in trials)

    logp, entropy, lse = logprobs_forward(
        problem.hidden, problem.weight, None, problem.targets, None,
        temperature=1.0, ignore_index=-100, with_entropy=True, tiles=best,
    )  # fmt: skip
    dh, dw, _ = logprobs_backward(
        problem.grad_logp, problem.grad_entropy, problem.hidden, problem.weight, None, problem.targets, None,
        lse, entropy, temperature=1.0, ignore_index=-100, tiles=best,
    )  # fmt: skip
    leaves = [x.double().requires_grad_() for x in (problem.hidden, problem.weight)]
    ref_logp, ref_ent = token_logprobs_reference(leaves[0], leaves[1], problem.targets, return_entropy=True)
    ((ref_logp * problem.grad_logp.double()).sum() + (ref_ent * problem.grad_entropy.double()).sum()).backward()
    for actual, expected in ((logp, ref_logp), (entropy, ref_ent), (dh, leaves[0].grad), (dw, leaves[1].grad)):
        scale = max(1.0, expected.abs().max().item())
        assert (actual.double() - expected).abs().max().item() <= 2e-2 * scale


def test_cli_writes_a_file_load_tiles_reads(tmp_path) -> None:
    out = tmp_path / "tiles.json"
    argv = ["--device", DEVICE.type, "--out", str(out), "--n", "20", "--h", "24", "--v", "50", "--dtype", "float32",
            "--repeats", "1", "--kernels", "fwd", "dh"]  # fmt: skip
    logprobs_tune.main(argv)

    record = json.loads(out.read_text())
    assert record["shape"] == {"n": 20, "h": 24, "v": 50} and record["dtype"] == "float32"
    assert record["start_tiles"] == START.to_dict()
    assert {t["knob"] for t in record["trials"]} >= {"fwd.tile", "dh.tile", "chunk_bytes"}
    assert load_tiles(out) == LogprobTiles.from_dict(record["tiles"])
    assert record["complete"] is True and not out.with_suffix(".tmp").exists()


def test_cli_leaves_the_best_tiles_so_far_when_stopped(tmp_path, monkeypatch) -> None:
    """A tune killed by a time limit after its first knob still leaves a file load_tiles reads."""
    out = tmp_path / "tiles.json"
    knobs_done: list[str] = []

    def measure_or_stop(fn, device, repeats):
        if knobs_done:
            raise KeyboardInterrupt  # stands in for the kill: after the first knob's file was written
        return 1.0

    real_tune = logprobs_tune.tune

    def tune_recording(*args, on_knob, **kwargs):
        return real_tune(*args, on_knob=lambda best, trials: (on_knob(best, trials), knobs_done.append("x")), **kwargs)

    monkeypatch.setattr(logprobs_tune, "time_ms", measure_or_stop)
    monkeypatch.setattr(logprobs_tune, "tune", tune_recording)
    argv = ["--device", DEVICE.type, "--out", str(out), "--n", "20", "--h", "24", "--v", "50", "--dtype", "float32",
            "--repeats", "1", "--kernels", "fwd"]  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        logprobs_tune.main(argv)
    record = json.loads(out.read_text())
    assert record["complete"] is False and {t["knob"] for t in record["trials"]} == {"fwd.tile"}
    assert load_tiles(out) == LogprobTiles.from_dict(record["tiles"])


def test_cli_errors(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        logprobs_tune.main(["--device", "cpu"])
    expected = "--out is required off CUDA" if DEVICE.type == "cpu" else "run off CUDA only under TRITON_INTERPRET=1"
    assert expected in capsys.readouterr().err
    with pytest.raises(ValueError, match="kernels must be a subset"):
        tune(_problem(), START, kernels=("fwd", "lse"))
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        tune(_problem(), replace(START), repeats=0)
