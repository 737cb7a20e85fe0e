"""Config keys whose effect ``bao-fast eval`` must share with the trainer: ``model.dtype`` (the rollout
engine's precision on a GPU) and ``env.num_eval_tasks`` (which tasks are evaluated)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import torch

from bao_fast.config import load_config
from bao_fast.eval import evaluate
from bao_fast.rollout import HFEngine
from bao_fast.rollout.vllm_engine import VLLMEngine
from bao_fast.train.runtime import config_tasks


@pytest.mark.parametrize("kind", ["hf", "vllm"])
@pytest.mark.parametrize(("cuda", "expected"), [(True, "float16"), (False, "float32")])
def test_eval_engine_runs_in_model_dtype(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kind: str, cuda: bool, expected: str
) -> None:
    calls: list[dict[str, Any]] = []

    def capture(cls: type, model_path: Path, cfg: Any, *args: Any, **kwargs: Any) -> str:
        calls.append(kwargs)
        return "engine"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(HFEngine, "from_config", classmethod(capture))
    monkeypatch.setattr(VLLMEngine, "from_config", classmethod(capture))
    cfg = load_config(None, [f"model.path={tmp_path}", "model.dtype=float16"])
    assert evaluate._build_engine(kind, tmp_path, cfg) == "engine"
    assert calls[0]["dtype"] == expected


def _task_ids(tasks: list[Any]) -> list[str]:
    return [t.id for t in tasks]


@pytest.mark.parametrize(
    "overrides",
    [
        ["env.num_eval_tasks=3"],  # fewer than eval.num_tasks (78)
        ["env.num_eval_tasks=6", "eval.num_tasks=4"],
        ["env.name=telepathy", "env.num_train_tasks=24", "env.num_eval_tasks=8"],  # 8 test tasks: 78 would fail
    ],
)
def test_eval_tasks_are_the_trainers(overrides: list[str]) -> None:
    cfg = load_config(None, ["model.tiny=true", *overrides])
    n = min(cfg.env.num_eval_tasks, cfg.eval.num_tasks)
    trainer = config_tasks(cfg, "test", n, "env.num_eval_tasks")  # as bao_fast.train.rl.setup
    assert _task_ids(evaluate.eval_tasks(cfg)) == _task_ids(trainer)


def test_num_tasks_flag_sets_the_task_count(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    args = parser.parse_args(["--checkpoint", str(tmp_path), "--num-tasks", "5", "env.num_eval_tasks=3"])
    cfg = evaluate._config(args)
    assert len(evaluate.eval_tasks(cfg)) == 5
