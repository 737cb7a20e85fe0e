"""SFT resumes exactly: a run stopped after a step and rerun logs the losses, and exports the weights, of an
uninterrupted run; only complete checkpoints exist; ``checkpoint.resume=false`` starts over.

Six optimiser steps (two epochs of three), checkpoints every two steps keeping one, on one rank. The stopped
run ends after step 5: its checkpoint is step 4 (mid-epoch 1, after an eval), and its step-5 record is stale.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bao_fast.train.checkpoint import latest_checkpoint
from bao_fast.train.logging import read_jsonl

from .conftest import run_worker, worker_process

pytestmark = pytest.mark.slow

DEMO_CONFIG = str(Path(__file__).parents[2] / "configs" / "demo-cpu.yaml")
BASE = [
    "sft.num_trajectories=7", "sft.eval_fraction=0.15", "sft.epochs=2", "sft.batch_trajectories=2",
    "sft.micro_batch_tokens=1600", "checkpoint.save_every=2", "checkpoint.keep_last=1", "logging.progress=false",
]
STOP = 5
VOLATILE = ("time", "tokens_per_s")


def sft_args(run_dir: Path, overrides: tuple[str, ...] = (), stop_after: int | None = None) -> list[str]:
    """``_train_worker.py``'s arguments for SFT on ``run_dir``."""
    spec = {"config": DEMO_CONFIG, "overrides": [*BASE, f"run_dir={run_dir}", *overrides],
            "stop_after": stop_after, "stage": "sft"}
    return [json.dumps(spec), str(run_dir.with_suffix(".json"))]


def sft_run(
    run_dir: Path, overrides: tuple[str, ...] = (), stop_after: int | None = None, nproc: int = 1
) -> str | None:
    """Run SFT on ``run_dir`` in fresh processes; returns the exported model's path (None when stopped)."""
    run_worker("_train_worker.py", sft_args(run_dir, overrides, stop_after), nproc=nproc, timeout=200)
    return json.loads(run_dir.with_suffix(".json").read_text())["model"]


def stable(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in read_jsonl(run_dir / "sft.jsonl")]


def assert_same_model(run_dir: Path, reference: Path) -> None:
    final = load_file(run_dir / "sft-model" / "model.safetensors")
    expected = load_file(reference / "sft-model" / "model.safetensors")
    assert final.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(final[key], value), key


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    assert sft_run(run_dir) == str(run_dir / "sft-model")
    return run_dir


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    assert sft_run(run_dir, stop_after=STOP) is None
    return run_dir


@pytest.fixture
def stopped_copy(stopped: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(stopped, run_dir)
    return run_dir


def test_straight_run_logs_every_step_and_leaves_no_checkpoints(straight: Path) -> None:
    assert [(r["step"], "eval_loss" in r) for r in stable(straight)] == [
        (1, False), (2, False), (3, False), (3, True), (4, False), (5, False), (6, False), (6, True)
    ]
    assert not (straight / "sft-checkpoints").exists()  # the export replaced them


def test_resume_after_stop_reproduces_the_straight_run(straight: Path, stopped_copy: Path) -> None:
    run_dir, root = stopped_copy, stopped_copy / "sft-checkpoints"
    assert not (run_dir / "sft-model").exists()
    assert sorted(p.name for p in root.iterdir()) == ["step-000004"]  # complete only, keep_last=1
    assert latest_checkpoint(root) == root / "step-000004"
    assert stable(run_dir)[-1]["step"] == STOP  # a record past the checkpoint: stale on resume
    (root / ".tmp-step-000006").mkdir()  # a write that crashed: never resumed from
    assert sft_run(run_dir) == str(run_dir / "sft-model")
    assert stable(run_dir) == stable(straight)
    assert_same_model(run_dir, straight)
    assert not root.exists()


def test_resume_false_starts_over(straight: Path, stopped_copy: Path) -> None:
    run_dir = stopped_copy
    first_time = read_jsonl(run_dir / "sft.jsonl")[0]["time"]
    (run_dir / "sft-checkpoints" / "step-000006").mkdir()  # would outrank this run's checkpoints
    (run_dir / "sft-model").mkdir()
    (run_dir / "sft-model" / "config.json").write_text("{}")  # an earlier export: neither reused nor kept
    # the new run dies after step 2: nothing of the earlier run may survive for a later resume to pick up
    assert sft_run(run_dir, ("checkpoint.resume=false",), stop_after=2) is None
    assert not (run_dir / "sft-model").exists()
    assert sorted(p.name for p in (run_dir / "sft-checkpoints").iterdir()) == ["step-000002"]
    assert read_jsonl(run_dir / "sft.jsonl")[0]["time"] > first_time  # step 1 was trained again
    assert stable(run_dir) == stable(straight)[:2]
    assert sft_run(run_dir) == str(run_dir / "sft-model")  # and resuming it finishes the straight run
    assert stable(run_dir) == stable(straight)
    assert_same_model(run_dir, straight)


def test_sft_started_over_drops_the_rl_outputs_of_the_old_export(stopped_copy: Path) -> None:
    """RL checkpoints, export and evals derive from the SFT export: a new SFT (``bao-fast sft`` with
    ``checkpoint.resume=false``) deletes them, or a later ``bao-fast train`` would resume RL on the old model."""
    run_dir = stopped_copy
    (run_dir / "checkpoints" / "step-000001").mkdir(parents=True)
    (run_dir / "final-model").mkdir()
    (run_dir / "final-model" / "config.json").write_text("{}")
    (run_dir / "evals.json").write_text("[]")
    assert sft_run(run_dir, ("checkpoint.resume=false",), stop_after=1) is None
    assert not any((run_dir / name).exists() for name in ("checkpoints", "final-model", "evals.json"))


def test_resume_reads_the_data_file_and_refuses_other_data(stopped_copy: Path) -> None:
    """A resumed run trains on the recorded episodes, not on a new play; checkpoints of other data are refused."""
    path = stopped_copy / "sft-data.jsonl"
    header, first, *rest = path.read_text().splitlines()
    record = json.loads(first)
    turn = next(m for m in record["messages"] if m["role"] == "assistant")
    turn["content"] += " Edited."
    path.write_text("\n".join([header, json.dumps(record), *rest]) + "\n")
    refused = r"other SFT data than this run's sft-data\.jsonl \(the checkpoint has data digest [0-9a-f]{32}, this run"
    with pytest.raises(pytest.fail.Exception, match=refused):
        sft_run(stopped_copy)


def test_dynamic_loss_scaling_stopped_and_resumed_trains_the_unscaled_model(straight: Path, tmp_path: Path) -> None:
    """sft.optim.loss_scale=dynamic in float32 is exact (a power-of-two scale), also across a resume that restores
    the scale: the same losses and, bit for bit, the same model as the unscaled straight run."""
    run_dir, scaled = tmp_path / "run", ("sft.optim.loss_scale=dynamic",)
    assert sft_run(run_dir, scaled, stop_after=STOP) is None
    assert sft_run(run_dir, scaled) == str(run_dir / "sft-model")
    records = stable(run_dir)
    assert all(r["loss_scale"] == 2.0**16 and r["overflow"] is False for r in records if "loss" in r)
    drop = ("loss_scale", "overflow")
    assert [{k: v for k, v in r.items() if k not in drop} for r in records] == stable(straight)
    assert_same_model(run_dir, straight)


def test_run_stopped_on_two_ranks_resumes_on_one(straight: Path, tmp_path: Path) -> None:
    """The step-4 checkpoint of 2 ranks is resharded onto 1: the resumed run logs the straight 1-rank run's
    losses up to float summation order (2 ranks' data split is global-token normalised), and trains its model."""
    run_dir = tmp_path / "run"
    assert sft_run(run_dir, stop_after=STOP, nproc=2) is None
    proc = worker_process("_train_worker.py", sft_args(run_dir))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert f"resuming SFT after step 4 from {run_dir / 'sft-checkpoints' / 'step-000004'} " \
           "(saved by 2 ranks, resharded onto 1)" in proc.stderr
    resumed, reference = stable(run_dir), stable(straight)
    assert [(r["step"], sorted(r)) for r in resumed] == [(r["step"], sorted(r)) for r in reference]
    for got, want in zip(resumed, reference, strict=True):
        for key, value in want.items():
            assert got[key] == (pytest.approx(value, rel=1e-4) if isinstance(value, float) else value), (got, key)
    final = load_file(run_dir / "sft-model" / "model.safetensors")
    for key, value in load_file(straight / "sft-model" / "model.safetensors").items():
        torch.testing.assert_close(final[key], value, rtol=1e-4, atol=1e-5, msg=key)
