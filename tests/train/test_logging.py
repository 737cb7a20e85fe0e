"""JSONL metrics logger and the non-finite step guard."""

from __future__ import annotations

import json
import math
import os
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bao_fast.config import LoggingConfig
from bao_fast.train.logging import MetricsLogger, NonFiniteError, NonFiniteGuard, read_jsonl


def test_jsonl_records_and_nonfinite_values(tmp_path: Path) -> None:
    cfg = LoggingConfig(progress=False)
    logger = MetricsLogger(tmp_path, cfg, name="train", total=3)
    logger.log(1, {"loss": 0.5, "note": "ok"})
    logger.log(2, {"loss": float("nan"), "grad_norm": float("inf")})
    logger.close()
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["step"] == 1 and first["loss"] == 0.5 and first["note"] == "ok" and "time" in first
    assert second["loss"] == "nan" and second["grad_norm"] == "inf"


def test_resume_drops_records_after_the_checkpoint(tmp_path: Path) -> None:
    cfg = LoggingConfig(progress=False)
    logger = MetricsLogger(tmp_path, cfg, name="train", total=5)
    for step in range(1, 5):
        logger.log(step, {"loss": float(step)})
    logger.close()
    resumed = MetricsLogger(tmp_path, cfg, name="train", total=5, resume_step=2)
    resumed.log(3, {"loss": 30.0})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "train.jsonl")] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_nested_nonfinite_and_numpy_values_stay_strict_json(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, LoggingConfig(progress=False), name="train", total=1)
    logger.log(1, {"pass_at_u": {"1": float("nan"), "2": [1.0, float("-inf")]}, "loss": np.float32(0.25),
                   "count": np.int64(3)})
    logger.close()
    line = (tmp_path / "train.jsonl").read_text()
    record = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert record["pass_at_u"] == {"1": "nan", "2": [1.0, "-inf"]}
    assert (record["loss"], record["count"]) == (0.25, 3)
    with pytest.raises(RuntimeError, match=r"MetricsLogger\.log after close"):
        logger.log(2, {"loss": 1.0})


def test_a_torn_last_line_is_left_out_and_resume_rewrites_whole(tmp_path: Path, monkeypatch) -> None:
    """A run killed mid-write leaves a last line without its newline: reading skips it (a bad line elsewhere
    still raises); the resume rewrite goes through a temporary file, so a failed write keeps the history."""
    cfg = LoggingConfig(progress=False)
    path = tmp_path / "train.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo')
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space left"):
        MetricsLogger(tmp_path, cfg, name="train", total=5, resume_step=1)
    assert path.read_text().startswith('{"step": 1, "loss": 1.0}\n{"step": 2')  # untouched
    monkeypatch.setattr(os, "replace", real_replace)
    MetricsLogger(tmp_path, cfg, name="train", total=5, resume_step=1).close()
    assert path.read_text() == '{"step": 1, "loss": 1.0}\n'
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(json.JSONDecodeError):
        read_jsonl(path)


def test_disabled_logger_writes_nothing(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, LoggingConfig(), name="train", total=1, enabled=False)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "train.jsonl").exists()


def test_progress_bar_runs(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, LoggingConfig(progress=True), name="train", total=2)
    logger.advance_to(1)
    logger.log(2, {"loss": 1.0}, status="loss 1.0")
    logger.close()
    assert read_jsonl(tmp_path / "train.jsonl")[0]["step"] == 2


def test_guard_skips_then_stops() -> None:
    guard = NonFiniteGuard(max_consecutive=3)
    assert guard.check(1, loss=1.0, grad_norm=2.0)
    assert not guard.check(2, loss=float("nan"), grad_norm=1.0)
    assert not guard.check(3, loss=1.0, grad_norm=float("inf"))
    assert guard.check(4, loss=1.0, grad_norm=1.0)
    assert guard.consecutive == 0 and guard.total_skipped == 2
    assert not guard.check(5, loss=math.nan)
    assert not guard.check(6, loss=math.nan)
    with pytest.raises(NonFiniteError, match="3 consecutive"):
        guard.check(7, loss=math.inf)
    state = guard.state_dict()
    fresh = NonFiniteGuard(3)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state == {"consecutive": 3, "total_skipped": 5}
    with pytest.raises(ValueError, match="max_consecutive"):
        NonFiniteGuard(0)


def test_tensorboard_mirror(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    logger = MetricsLogger(tmp_path, LoggingConfig(progress=False, tensorboard=True), name="train", total=1)
    logger.log(1, {"loss": 0.25, "note": "text is skipped"})
    logger.close()
    events = list((tmp_path / "tensorboard" / "train").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


def test_tensorboard_resume_purges_the_dropped_steps(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = LoggingConfig(progress=False, tensorboard=True)
    first = MetricsLogger(tmp_path, cfg, name="train", total=3)
    for step in (1, 2, 3):
        first.log(step, {"loss": float(step)})
    first.close()
    resumed = MetricsLogger(tmp_path, cfg, name="train", total=3, resume_step=1)
    resumed.log(2, {"loss": 20.0})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard" / "train"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 20.0)]


class _FakeRun:
    def __init__(self, logged: list[tuple[str | None, int]], run_id: str | None) -> None:
        self.logged, self.run_id = logged, run_id

    def log(self, scalars: dict[str, Any], step: int) -> None:
        self.logged.append((self.run_id, step))

    def finish(self) -> None:
        pass


def test_a_resumed_run_continues_its_wandb_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    inits: list[dict[str, Any]] = []
    logged: list[tuple[str | None, int]] = []

    def init(**kwargs: Any) -> _FakeRun:
        inits.append(kwargs)
        return _FakeRun(logged, kwargs.get("id"))

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    cfg = LoggingConfig(progress=False, wandb=True, wandb_project="p")

    def run(resume_step: int, steps: range) -> str | None:
        logger = MetricsLogger(tmp_path, cfg, name="train", total=4, resume_step=resume_step)
        for step in steps:
            logger.log(step, {"reward": 0.5})
        logger.close()
        return inits[-1].get("id")

    first = run(-1, range(1, 3))  # fresh start, stopped after step 2
    assert first is not None and run(2, range(3, 5)) == first  # resumed after step 2: the same wandb run
    assert logged == [(first, 1), (first, 2), (first, 3), (first, 4)]
    assert run(-1, range(1, 2)) not in (None, first)  # checkpoint.resume=false: a new wandb run
    assert all(i["resume"] == "allow" and i["project"] == "p" for i in inits)
