"""Plot files: both formats written, valid headers, labels present as SVG text, bad input rejected."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bao_fast.eval.pareto import ParetoPoint, pareto_front
from bao_fast.eval.plots import label_offsets, plot_pareto, plot_pass_at_u

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _points() -> list[ParetoPoint]:
    return [
        ParetoPoint("bao", 0.69, 0.21, (0.59, 0.79), (0.18, 0.25), (0.27, 0.45, 0.55, 0.6, 0.69)),
        ParetoPoint("userrl", 0.53, 0.38, None, None, (0.24, 0.35, 0.45, 0.5, 0.53)),
        ParetoPoint("noreg", 0.72, 0.91, (0.6, 0.8), None, (0.33, 0.5, 0.6, 0.7, 0.72)),
        ParetoPoint("untrained", 0.05, 0.1),
    ]


def test_pareto_plot_writes_png_and_svg_with_labels(tmp_path: Path) -> None:
    points = _points()
    paths = plot_pareto(points, pareto_front(points), tmp_path / "sub" / "pareto")
    assert [p.name for p in paths] == ["pareto.png", "pareto.svg"]
    assert paths[0].read_bytes()[:8] == PNG_MAGIC
    svg = paths[1].read_text()
    assert svg.lstrip().startswith("<?xml") and "</svg>" in svg
    for p in points:
        assert p.label in svg
    assert "Pareto frontier" in svg


def test_labels_of_coinciding_points_are_stacked(tmp_path: Path) -> None:
    points = [ParetoPoint("run-a", 0.0, 0.0), ParetoPoint("run-b", 0.5, 0.2), ParetoPoint("run-c", 0.0, 0.00001),
              ParetoPoint("run-d", 0.0, 0.0)]
    assert label_offsets(points) == [(6.0, 5.0), (6.0, 5.0), (6.0, 15.0), (6.0, 25.0)]
    svg = plot_pareto(points, pareto_front(points), tmp_path / "p")[1].read_text()
    y = {label: float(v) for v, label in re.findall(r'<text[^>]* y="([-\d.]+)"[^>]*>(run-\w)</text>', svg)}
    assert set(y) == {"run-a", "run-b", "run-c", "run-d"}
    assert y["run-a"] - y["run-c"] == pytest.approx(y["run-c"] - y["run-d"]) and y["run-c"] < y["run-a"]


def test_pass_at_u_plot_skips_points_without_curves(tmp_path: Path) -> None:
    paths = plot_pass_at_u(_points(), tmp_path / "pass")
    svg = paths[1].read_text()
    assert paths[0].read_bytes()[:8] == PNG_MAGIC
    assert "bao" in svg and "noreg" in svg and "untrained" not in svg


def test_plots_reject_empty_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="points"):
        plot_pareto([], [], tmp_path / "x")
    with pytest.raises(ValueError, match="Pass@U-k"):
        plot_pass_at_u([ParetoPoint("a", 0.1, 0.1)], tmp_path / "y")
