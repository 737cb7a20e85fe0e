"""Figures of the task-reward vs user-effort trade-off (matplotlib, Agg canvas, no pyplot state).

Each function writes ``<stem>.png`` and ``<stem>.svg`` and returns both paths.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from bao_fast.eval.pareto import ParetoPoint

FORMATS: tuple[str, ...] = ("png", "svg")


def _save(fig: Figure, stem: Path) -> list[Path]:
    FigureCanvasAgg(fig)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    with rc_context({"svg.fonttype": "none"}):  # SVG text stays text: searchable, editable
        for fmt in FORMATS:
            path = stem.with_name(f"{stem.name}.{fmt}")
            fig.savefig(path, format=fmt, dpi=150, bbox_inches="tight")
            paths.append(path)
    return paths


def _ci_err(value: float, ci: tuple[float, float] | None) -> list[float]:
    if ci is None:
        return [0.0, 0.0]
    return [max(0.0, value - ci[0]), max(0.0, ci[1] - value)]


def label_offsets(points: Sequence[ParetoPoint], line_pt: float = 10.0) -> list[tuple[float, float]]:
    """Text offsets (points) of the labels: right of and above each marker, stacked one line apart for
    points at the same (UR, Score) to 4 decimals (a sweep's untrained runs often coincide)."""
    seen: dict[tuple[float, float], int] = {}
    offsets = []
    for p in points:
        key = (round(p.ur, 4), round(p.score, 4))
        k = seen.get(key, 0)
        seen[key] = k + 1
        offsets.append((6.0, 5.0 + k * line_pt))
    return offsets


def plot_pareto(points: Sequence[ParetoPoint], front: Sequence[int], stem: str | Path) -> list[Path]:
    """Scatter of Score (y, higher is better) against UR (x, lower is better) with 95% CI bars; the
    non-dominated points ``front`` (indices into ``points``) are filled and joined by the frontier's
    staircase. Every point is labelled; labels of coinciding points are stacked."""
    if not points:
        raise ValueError("points: nothing to plot")
    on_front = set(front)
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    for i, (p, offset) in enumerate(zip(points, label_offsets(points), strict=True)):
        filled = i in on_front
        ax.errorbar(
            p.ur,
            p.score,
            xerr=[[v] for v in _ci_err(p.ur, p.ur_ci)],
            yerr=[[v] for v in _ci_err(p.score, p.score_ci)],
            fmt="o",
            color="C0" if filled else "0.55",
            mfc="C0" if filled else "white",
            ms=7,
            capsize=3,
            lw=1,
        )
        ax.annotate(p.label, (p.ur, p.score), xytext=offset, textcoords="offset points", fontsize=8)
    if front:
        ordered = sorted((points[i] for i in front), key=lambda p: (p.ur, -p.score))
        xs = [ordered[0].ur]
        ys = [ordered[0].score]
        for prev, cur in itertools.pairwise(ordered):
            xs += [cur.ur, cur.ur]
            ys += [prev.score, cur.score]
        ax.plot(xs, ys, "-", color="C0", lw=1.5, label="Pareto frontier")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("UR: user-involved turns / turns (lower is better)")
    ax.set_ylabel("Score (higher is better)")
    ax.set_title("Task reward vs user effort")
    ax.grid(alpha=0.3)
    return _save(fig, Path(stem))


def plot_pass_at_u(points: Sequence[ParetoPoint], stem: str | Path) -> list[Path]:
    """Pass@U-k against k (the number of answer submissions allowed), one line per point."""
    curves = [p for p in points if p.pass_at_u]
    if not curves:
        raise ValueError("points: none carries a Pass@U-k curve")
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    for j, p in enumerate(curves):
        ks = range(1, len(p.pass_at_u) + 1)
        ax.plot(ks, p.pass_at_u, marker="o", ms=4, color=f"C{j % 10}", label=p.label)
    max_k = max(len(p.pass_at_u) for p in curves)
    ax.set_xticks(range(1, max_k + 1))
    ax.set_xlabel("k: answer submissions allowed")
    ax.set_ylabel("Pass@U-k")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Pass@U-k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(stem))
