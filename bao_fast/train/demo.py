"""``bao-fast demo`` (``make demo``): the embedded default run, end to end on a laptop CPU.

A tiny random-weight Qwen2 with the shipped tokenizer learns the Function gym: scripted-teacher SFT
(behaviour enhancement), then BAO RL, evaluated greedily before RL (the SFT model) and after it. Writes
to ``run_dir`` (``runs/demo``): ``sft.jsonl`` / ``train.jsonl`` metrics, ``final-model/`` (HF checkpoint),
``evals.json``, ``report.json`` + ``report.md`` (Score, Pass@U-k, UR for the SFT and the RL model) and the
plots ``pass_at_u.png`` (Pass@U-k curves) and ``training.png`` (reward, eval Score / UR, turns and the
BAO-shaped score per step).
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch.distributed as dist
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bao_fast.config import Config, load_config
from bao_fast.eval.pareto import point_from_summary
from bao_fast.eval.plots import plot_pass_at_u
from bao_fast.eval.report import fmt_ci, md_table
from bao_fast.train.fsdp import shutdown_distributed
from bao_fast.train.logging import read_jsonl
from bao_fast.train.rl import train

DEFAULT_CONFIG = "demo-cpu.yaml"


def default_config_path() -> Path:
    """The packaged ``bao_fast/configs/demo-cpu.yaml``."""
    return Path(str(resources.files("bao_fast.configs").joinpath(DEFAULT_CONFIG)))


def report_markdown(models: dict[str, dict[str, Any]], max_k: int, wall_s: float, greedy: bool) -> str:
    """Markdown table: one row per model with Score, Pass@U-1..max_k, UR (95% CIs) and turns; the title
    says whether the evaluation decoded greedily (``eval.greedy``) or sampled, and how long this command took
    (``wall_s``)."""
    header = ["model", "Score", *(f"Pass@U-{k}" for k in range(1, max_k + 1)), "UR", "turns", "episodes"]
    rows = []
    for label, s in models.items():
        passes = [f"{_pass(s, k):.3f}" for k in range(1, max_k + 1)]
        ci = s.get("score_ci")
        rows.append([label, fmt_ci(s["score"], ci), *passes, fmt_ci(s["ur"], s.get("ur_ci")), f"{s['turns']:.2f}",
                     s["num_episodes"]])
    mode = "Greedy" if greedy else "Sampled"
    title = (f"# bao-fast demo\n\n{mode} evaluation on the held-out tasks. This command took {wall_s / 60:.1f} min "
             "(a rerun resumes from the run's checkpoints and repeats no finished step).\n\n")
    return title + md_table(header, rows, "l" + "r" * (len(header) - 1))


def _pass(summary: dict[str, Any], k: int) -> float:
    table = summary["pass_at_u"]
    return float(table[k] if k in table else table[str(k)])


def plot_training(run_dir: Path, stem: Path, greedy: bool) -> Path:
    """Two panels against the RL step, from ``train.jsonl``: rollout reward with the (greedy or sampled) eval
    Score and UR (left); turns per episode and the mean BAO-shaped trajectory score (right)."""
    records = read_jsonl(run_dir / "train.jsonl")
    steps = [r for r in records if "reward" in r]
    evals = [r for r in records if "eval/score" in r]
    x, xe = [r["step"] for r in steps], [r["step"] for r in evals]
    fig = Figure(figsize=(10, 3.5))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    left.plot(x, [r["reward"] for r in steps], marker=".", label="rollout reward")
    mode = "greedy" if greedy else "sampled"
    left.plot(xe, [r["eval/score"] for r in evals], marker="o", label=f"eval Score ({mode})")
    left.plot(xe, [r["eval/ur"] for r in evals], marker="s", ls="--", label="eval UR")
    left.set_ylim(-0.02, 1.02)
    right.plot(x, [r["turns"] for r in steps], marker=".", label="rollout turns")
    right.plot(xe, [r["eval/turns"] for r in evals], marker="o", label=f"eval turns ({mode})")
    right.plot(x, [r["score_shaped_mean"] for r in steps], marker="^", ls="--", label="shaped score (BAO)")
    for ax in (left, right):
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    path = stem.with_suffix(".png")
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


def write_report(cfg: Config, evals: list[dict[str, Any]], wall_s: float) -> dict[str, Path]:
    """Write report.json, report.md, pass_at_u.png and training.png under ``cfg.run_dir``."""
    run_dir = Path(cfg.run_dir)
    models = {"SFT" if cfg.sft.enabled else "initial": evals[0], f"{cfg.algo.name.upper()} RL": evals[-1]}
    (run_dir / "report.json").write_text(json.dumps({"wall_s": wall_s, "models": models}, indent=1))
    (run_dir / "report.md").write_text(report_markdown(models, cfg.eval.max_k, wall_s, cfg.eval.greedy))
    points = [point_from_summary(s, label) for label, s in models.items()]
    plot_pass_at_u(points, run_dir / "pass_at_u")
    plot_training(run_dir, run_dir / "training", cfg.eval.greedy)
    return {name: run_dir / name for name in ("report.json", "report.md", "pass_at_u.png", "training.png")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help=f"run config (default: the packaged {DEFAULT_CONFIG})")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=4 run_dir=runs/demo2")


def run(args: argparse.Namespace) -> int:
    """Run the demo and print the SFT-vs-RL table."""
    cfg = load_config(args.config or default_config_path(), args.overrides)
    start = time.perf_counter()
    try:
        evals = train(cfg)
        if dist.get_rank() == 0:
            paths = write_report(cfg, evals, time.perf_counter() - start)
            print(paths["report.md"].read_text())
            print("wrote " + ", ".join(str(p) for p in paths.values()))
    finally:
        shutdown_distributed()
    return 0
