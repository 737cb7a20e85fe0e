"""Run logging: JSONL metrics (always), a rich progress bar with ETA, optional TensorBoard and wandb, and
the guard that skips optimiser steps whose loss or gradient norm is not finite.

Only rank 0 writes; every other rank gets a logger whose methods do nothing but keep the same API.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from bao_fast.config import LoggingConfig


class NonFiniteError(RuntimeError):
    """Raised after too many consecutive optimiser steps with a non-finite loss or gradient norm."""


class NonFiniteGuard:
    """Counts consecutive non-finite steps; ``check`` returns True when the step may be applied."""

    def __init__(self, max_consecutive: int) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total_skipped = 0

    def check(self, step: int, **values: float) -> bool:
        """True when every value is finite. Otherwise count a skip and raise NonFiniteError once
        ``max_consecutive`` skips happened in a row."""
        bad = {name: value for name, value in values.items() if not math.isfinite(value)}
        if not bad:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total_skipped += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"step {step}: {self.consecutive} consecutive steps with non-finite values {bad}; stopping "
                "(train.max_nonfinite_steps)"
            )
        return False

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total_skipped": self.total_skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive = int(state["consecutive"])
        self.total_skipped = int(state["total_skipped"])


def _wandb_run_id(path: Path, fresh: bool) -> str:
    """The id of the logger's wandb run, kept in ``path``: the saved one, so that a resumed run continues its
    wandb run, unless ``fresh`` (a start over) or none is saved; then a new one, saved."""
    if not fresh and path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex
    path.write_text(run_id)
    return run_id


def _jsonable(value: Any) -> Any:
    """``value`` as strict JSON holds it, at any depth: NumPy scalars become Python numbers, floats JSON cannot
    hold (nan, inf) become strings, so every line stays valid JSON."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


class MetricsLogger:
    """Writes one JSON object per ``log`` call to ``<run_dir>/<name>.jsonl`` and mirrors scalars to
    TensorBoard / wandb when enabled. ``progress`` drives a rich bar over ``total`` steps. ``resume_step``
    drops records of steps after it (written by a run that died before its next checkpoint; -1 drops all: a
    fresh start over an earlier run's directory). A resumed run logs to the wandb run it started (its id is
    kept in ``<run_dir>/<name>.wandb-id``); a fresh start begins a new one."""

    def __init__(
        self, run_dir: str | Path, cfg: LoggingConfig, *, name: str, total: int, enabled: bool = True,
        run_config: dict[str, Any] | None = None, resume_step: int | None = None,
    ) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / f"{name}.jsonl"
        self._file = None
        self._tb = None
        self._wandb = None
        self._progress = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_jsonl(self.path) if r["step"] <= resume_step]
            tmp = self.path.with_name(self.path.name + ".tmp")  # replaced whole: a failed write keeps the history
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
            os.replace(tmp, self.path)
        self._file = self.path.open("a", encoding="utf-8")
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError("logging.tensorboard=true needs the 'tensorboard' package") from exc
            # purge_step: on resume, events of the dropped steps go too (all of them for a fresh start)
            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard" / name), purge_step=purge)
        if cfg.wandb:
            try:
                import wandb
            except ImportError as exc:
                raise ImportError("logging.wandb=true needs the 'wandb' package") from exc
            run_id = _wandb_run_id(Path(run_dir) / f"{name}.wandb-id", fresh=resume_step == -1)
            self._wandb = wandb.init(project=cfg.wandb_project, name=f"{Path(run_dir).name}-{name}", id=run_id,
                                     dir=str(run_dir), config=run_config, resume="allow")
        if cfg.progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
            )
            self._task = self._progress.add_task(name, total=total, status="")
            self._progress.start()

    def advance_to(self, completed: int) -> None:
        """Move the progress bar (e.g. to the resumed step) without logging."""
        if self._progress is not None:
            self._progress.update(self._task, completed=completed)

    def log(self, step: int, metrics: dict[str, Any], *, status: str = "") -> None:
        """Append ``{"step": step, "time": ..., **metrics}`` and advance the bar to ``step``."""
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError(f"MetricsLogger.log after close ({self.path})")
        record = {"step": step, "time": round(time.time(), 3), **_jsonable(metrics)}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        plain = {k: v.item() if isinstance(v, np.generic) else v for k, v in metrics.items()}
        scalars = {k: v for k, v in plain.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, status=status)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._file = self._tb = self._wandb = self._progress = None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics file, in order. A last line without its newline that does not parse is a write
    the run did not finish (killed, disk full) and is left out; any other bad line raises."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
    return records
