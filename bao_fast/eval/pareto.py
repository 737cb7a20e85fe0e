"""``bao-fast pareto``: the non-dominated set on (Score ↑, UR ↓) over runs or evaluation summaries, the
Pass@U-k curves, their plots (PNG + SVG) and a markdown table.

Inputs are evaluation summaries (``summary.json`` written by ``bao-fast eval``), directories holding one,
or training run directories (their final evaluation, from ``evals.json``). ``NAME=PATH`` names a point;
otherwise the name is taken from the summary or the directory. ``--sweep base.yaml --grid key=v1,v2 ...``
first trains one run per grid combination (``bao_fast.eval.sweep``, as ``bao-fast train`` subprocesses)
and adds each run's final evaluation (the trainer evaluates on the test split after its last step, per
``eval.*``).

Example::

    bao-fast pareto bao=runs/bao userrl=runs/userrl untrained=eval/base/summary.json --out pareto/
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bao_fast.cli import UsageError
from bao_fast.eval import plots, report, sweep

SUMMARY_FILE = "summary.json"
RUN_EVALS_FILE = "evals.json"


@dataclass(frozen=True)
class ParetoPoint:
    """One evaluated policy: Score and UR in [0, 1] with optional 95% CIs, and its Pass@U-k curve
    (``pass_at_u[k-1]`` = Pass@U-k)."""

    label: str
    score: float
    ur: float
    score_ci: tuple[float, float] | None = None
    ur_ci: tuple[float, float] | None = None
    pass_at_u: tuple[float, ...] = ()
    turns: float | None = None
    num_episodes: int | None = None
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("score", "ur"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"ParetoPoint({self.label!r}).{name} must be a finite number, got {value!r}")


def pareto_front(points: Sequence[ParetoPoint]) -> list[int]:
    """Indices of the points not dominated on (Score ↑, UR ↓), ordered by UR then Score descending.

    ``q`` dominates ``p`` when ``q.score >= p.score`` and ``q.ur <= p.ur`` with one inequality strict, so
    exact duplicates are all kept. O(n log n): one sweep in order of increasing UR.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i].ur, -points[i].score))
    front: list[int] = []
    best_score = -math.inf
    best_ur = math.inf  # the lowest UR reaching best_score
    for i in order:
        p = points[i]
        if p.score > best_score:
            best_score, best_ur = p.score, p.ur
            front.append(i)
        elif p.score == best_score and p.ur == best_ur:
            front.append(i)
    return front


def _ci(value: Any, key: str, source: str) -> tuple[float, float] | None:
    if value is None:
        return None
    if not (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2):
        raise UsageError(f"{source or 'summary'}: '{key}' must be a [low, high] pair, got {value!r}")
    return _number(value[0], key, source), _number(value[1], key, source)


def _number(value: Any, key: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise UsageError(f"{source or 'summary'}: '{key}' must be a finite number, got {value!r}")
    return float(value)


def point_from_summary(summary: Mapping[str, Any], label: str, source: str = "") -> ParetoPoint:
    """A point from an evaluation summary as written by ``bao-fast eval`` (``metrics.summarize``); a
    UsageError naming ``source`` and the key when a value is missing or not a finite number."""
    for key in ("score", "ur"):
        if key not in summary:
            raise UsageError(f"{source or 'summary'}: missing key '{key}' (is this an evaluation summary?)")
    pass_at_u = summary.get("pass_at_u", {})
    if isinstance(pass_at_u, Mapping):  # {"1": p1, "2": p2, ...} once through JSON
        ks = sorted(int(k) for k in pass_at_u if re.fullmatch(r"[1-9][0-9]{0,5}", str(k)))
        if len(ks) != len(pass_at_u) or ks != list(range(1, len(ks) + 1)):  # the curve's position is its k
            raise UsageError(f"{source or 'summary'}: 'pass_at_u' keys must be k = 1, 2, ..., K without gaps, "
                             f"got {list(pass_at_u)}")
        curve = tuple(_number(pass_at_u[k], f"pass_at_u.{k}", source) for k in sorted(pass_at_u, key=int))
    elif isinstance(pass_at_u, Sequence) and not isinstance(pass_at_u, str):
        curve = tuple(_number(v, "pass_at_u", source) for v in pass_at_u)
    else:
        raise UsageError(f"{source or 'summary'}: 'pass_at_u' must map k to Pass@U-k, got {pass_at_u!r}")
    turns = summary.get("turns")
    return ParetoPoint(
        label=label,
        score=_number(summary["score"], "score", source),
        ur=_number(summary["ur"], "ur", source),
        score_ci=_ci(summary.get("score_ci"), "score_ci", source),
        ur_ci=_ci(summary.get("ur_ci"), "ur_ci", source),
        pass_at_u=curve,
        turns=None if turns is None else _number(turns, "turns", source),
        num_episodes=summary.get("num_episodes"),
        source=source,
    )


def load_summary(path: str | Path) -> tuple[dict[str, Any], Path]:
    """The evaluation summary of ``path`` and the file it came from.

    ``path`` is a summary file; a directory holding ``summary.json`` (``bao-fast eval --out``); a training
    run directory (the last entry of its ``evals.json``, i.e. the final greedy evaluation the trainer ran);
    or any directory with summaries below it (the newest ``summary.json``).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"inputs: {p} does not exist")
    if p.is_dir():
        if (p / SUMMARY_FILE).is_file():
            p = p / SUMMARY_FILE
        elif (p / RUN_EVALS_FILE).is_file():
            p = p / RUN_EVALS_FILE
        else:
            found = sorted(p.rglob(SUMMARY_FILE), key=lambda f: f.stat().st_mtime)
            if not found:
                raise FileNotFoundError(
                    f"inputs: no {SUMMARY_FILE} or {RUN_EVALS_FILE} in {p} (run `bao-fast eval` on it first)"
                )
            p = found[-1]
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{p}: not a JSON evaluation summary ({exc})") from exc
    if isinstance(data, list):  # a run's evals.json: one summary per evaluated step
        if not data or not isinstance(data[-1], dict):
            raise UsageError(f"{p}: expected a non-empty list of evaluation summaries")
        data = data[-1]
    if not isinstance(data, dict):
        raise UsageError(f"{p}: expected an evaluation summary (a JSON object)")
    return data, p


def _default_label(summary: Mapping[str, Any], summary_path: Path, given: Path) -> str:
    if isinstance(summary.get("label"), str) and summary["label"]:
        return summary["label"]
    if given.is_dir():
        return given.resolve().name
    return summary_path.resolve().parent.name


def load_point(spec: str) -> ParetoPoint:
    """``PATH`` or ``NAME=PATH`` -> the point of that summary / evaluation directory / run directory."""
    label, sep, raw = spec.partition("=")
    if not sep or Path(spec).exists():
        label, raw = "", spec
    summary, path = load_summary(raw)
    return point_from_summary(summary, label or _default_label(summary, path, Path(raw)), source=str(path))


def check_unique_labels(labels: Sequence[str]) -> None:
    """UsageError naming the labels that more than one point has (each names a point in the plots and tables)."""
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise UsageError(f"points: duplicate labels {dup}; name them with NAME=PATH")


def write_outputs(points: Sequence[ParetoPoint], out_dir: str | Path) -> dict[str, Path]:
    """Compute the front and write ``pareto.{png,svg}``, ``pass_at_u.{png,svg}`` (when curves exist),
    ``pareto.md`` and ``pareto.json`` into ``out_dir``; returns the written paths by name."""
    if not points:
        raise ValueError("points: no runs or summaries given")
    check_unique_labels([p.label for p in points])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    front = pareto_front(points)
    written: dict[str, Path] = {}
    written["pareto_png"], written["pareto_svg"] = plots.plot_pareto(points, front, out / "pareto")
    if any(p.pass_at_u for p in points):
        written["pass_at_u_png"], written["pass_at_u_svg"] = plots.plot_pass_at_u(points, out / "pass_at_u")
    written["markdown"] = out / "pareto.md"
    written["markdown"].write_text(report.pareto_markdown(points, front))
    written["json"] = out / "pareto.json"
    payload = {"points": [asdict(p) for p in points], "front": [points[i].label for i in front]}
    written["json"].write_text(json.dumps(payload, indent=2) + "\n")
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("inputs", nargs="*", metavar="[NAME=]PATH", help="summary.json, eval dir or run dir")
    parser.add_argument("--out", default="pareto", help="output directory (default: ./pareto)")
    parser.add_argument("--sweep", metavar="BASE_YAML", help="train one run per --grid combination first")
    parser.add_argument(
        "--grid",
        nargs="+",
        default=[],
        metavar="KEY=V1,V2",
        help="sweep axes as dotted config keys with comma-separated values (with --sweep)",
    )
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every sweep run")
    parser.add_argument("--dry-run", action="store_true", help="with --sweep: print the training commands only")


def run(args: argparse.Namespace) -> int:
    for flag, given in (("--grid", args.grid), ("--set", args.set), ("--dry-run", args.dry_run)):
        if given and not args.sweep:
            raise UsageError(f"{flag} needs --sweep BASE_YAML")
    if not args.inputs and not args.sweep:
        raise UsageError("give summaries / run directories ([NAME=]PATH), or --sweep")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file; give a directory")
    runs = sweep.plan(args.sweep, sweep.parse_grid(args.grid), Path(args.out) / "runs", args.set) if args.sweep else []
    if args.dry_run:
        for r in runs:
            print(" ".join(r.command))
        return 0
    points = [load_point(spec) for spec in args.inputs]
    check_unique_labels([p.label for p in points] + [r.label for r in runs])  # before any sweep run trains
    for r, run_dir in sweep.execute(runs):
        summary, path = load_summary(run_dir)
        points.append(point_from_summary(summary, r.label, source=str(path)))
    written = write_outputs(points, args.out)
    print(written["markdown"].read_text())
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0
