"""The demo: its report (SFT-vs-RL table, Pass@U-k plot, training curves) and a shrunken end-to-end run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bao_fast.config import load_config
from bao_fast.eval.metrics import summarize
from bao_fast.train.demo import default_config_path, write_report


def test_default_config_is_packaged() -> None:
    cfg = load_config(default_config_path())
    assert cfg.run_dir == "runs/demo" and cfg.model.tiny and cfg.rollout.engine == "vllm"


def test_write_report(tmp_path: Path) -> None:
    cfg = load_config(default_config_path(), [f"run_dir={tmp_path}"])
    sft = {"step": 0, **summarize([{"choices": ["search", "answer"], "rewards": [0.0, 0.0], "success": False}] * 4)}
    episodes = [{"choices": ["search", "answer"], "rewards": [0.0, 1.0], "success": True}] * 3
    episodes.append({"choices": ["answer", "answer"], "rewards": [0.0, 1.0], "success": True})
    rl = json.loads(json.dumps({"step": 2, **summarize(episodes)}))  # string Pass@U keys, as after a resume
    lines = [{"step": 0, "eval/score": 0.0, "eval/ur": 0.5, "eval/turns": 2.0}]
    lines += [{"step": s, "reward": 0.1 * s, "turns": 2.0, "score_shaped_mean": -0.2} for s in (1, 2)]
    lines.append({"step": 2, "eval/score": 1.0, "eval/ur": 0.625, "eval/turns": 2.0})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    paths = write_report(cfg, [sft, rl], wall_s=90.0)
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    table = paths["report.md"].read_text()
    assert "| SFT | 0.000" in table and "| BAO RL | 1.000" in table and "Pass@U-6" in table
    rl_row = next(line for line in table.splitlines() if line.startswith("| BAO RL"))
    assert "| 0.750 | 1.000 |" in rl_row  # Pass@U-1 = 3/4, Pass@U-2 = 1
    assert "This command took 1.5 min" in table
    report = json.loads(paths["report.json"].read_text())
    assert report["wall_s"] == 90.0 and set(report["models"]) == {"SFT", "BAO RL"}


def test_report_names_the_decoding(tmp_path: Path) -> None:
    """eval.greedy=false: the demo evaluated by sampling, and its report must not say greedy."""
    summary = {"step": 0, **summarize([{"choices": ["answer"], "rewards": [1.0], "success": True}] * 2)}
    lines = [{"step": 0, "eval/score": 1.0, "eval/ur": 1.0, "eval/turns": 1.0},
             {"step": 1, "reward": 0.5, "turns": 1.0, "score_shaped_mean": 0.0}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    for greedy, title in ((True, "Greedy evaluation"), (False, "Sampled evaluation")):
        cfg = load_config(default_config_path(), [f"run_dir={tmp_path}", f"eval.greedy={str(greedy).lower()}"])
        assert title in write_report(cfg, [summary, summary], wall_s=1.0)["report.md"].read_text()


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    """``bao-fast demo`` on a shrunken default (transformers engine, one RL step, two eval tasks): SFT, RL,
    both evaluations and the report, with the HF exports a user serves."""
    overrides = [
        f"run_dir={tmp_path}", "rollout.engine=hf", "sft.num_trajectories=4", "sft.epochs=1", "sft.eval_fraction=0.25",
        "train.steps=1", "rollout.prompts_per_step=2", "rollout.group_size=2", "train.mini_batch_size=2",
        "env.num_train_tasks=8", "env.num_eval_tasks=2", "eval.num_tasks=2", "eval.max_k=2",
        "rollout.max_turn_tokens=16", "logging.progress=false",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "bao_fast.cli", "demo", *overrides], capture_output=True, text=True,
                          env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| SFT | " in done.stdout and "| BAO RL | " in done.stdout and "Pass@U-2" in done.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["models"]) == {"SFT", "BAO RL"}
    assert all(m["num_episodes"] == 2 and set(m["pass_at_u"]) == {"1", "2"} for m in report["models"].values())
    for model in ("sft-model", "final-model"):
        assert (tmp_path / model / "model.safetensors").is_file() and (tmp_path / model / "config.json").is_file()
    steps = [json.loads(line)["step"] for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert 1 in steps
