"""``env.tasks_path`` of the LLM-user gyms: a dataset file is split into train and test like the built-in
tasks, so the trainer's evaluation (``env.num_eval_tasks``) never plays a training task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bao_fast.config import load_config
from bao_fast.envs import make_tasks
from bao_fast.train.runtime import config_tasks

ROWS = {
    "telepathy": lambda i: {"id": i, "entity": f"entity {i}", "category": "thing"},
    "intention": lambda i: {"id": i, "request": f"request {i}", "intentions": [f"detail: {i}"]},
    "turtle": lambda i: {"title": f"story {i}", "description": "surface", "ground_truth": "bottom",
                         "evaluation_criteria": [{"statement": "a", "score": 1}]},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(ROWS))
def test_a_tasks_file_is_split_into_disjoint_train_and_test(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps([ROWS[name](i) for i in range(20)]))
    split = {s: {t.id for t in make_tasks(name, split=s, path=str(path))} for s in ("train", "test", "all")}
    assert split["train"] and split["test"] and not split["train"] & split["test"]
    assert split["train"] | split["test"] == split["all"] and len(split["all"]) == 20
    cfg = load_config(None, ["model.tiny=true", f"env.name={name}", f"env.tasks_path={path}",
                             "env.num_train_tasks=12", "env.num_eval_tasks=4"])  # fmt: skip
    train = config_tasks(cfg, "train", cfg.env.num_train_tasks, "env.num_train_tasks")
    test = config_tasks(cfg, "test", cfg.env.num_eval_tasks, "env.num_eval_tasks")
    assert len(train) == 12 and len(test) == 4 and not {t.id for t in train} & {t.id for t in test}
