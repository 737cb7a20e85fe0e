"""Markdown rendering: tables, CIs, the Pareto table and one evaluation's summary (from real metrics)."""

from __future__ import annotations

import json

import pytest

from bao_fast.eval.metrics import summarize
from bao_fast.eval.pareto import ParetoPoint, pareto_front
from bao_fast.eval.report import fmt_ci, md_table, pareto_markdown, summary_markdown


def test_md_table_escapes_pipes_and_aligns() -> None:
    table = md_table(["a", "b"], [["x|y", 1], ["two\nlines", 2.5]], "lr")
    assert table.splitlines() == ["| a | b |", "|:---|---:|", "| x\\|y | 1 |", "| two lines | 2.5 |"]
    with pytest.raises(ValueError, match="rows"):
        md_table(["a"], [[1, 2]])
    with pytest.raises(ValueError, match="align"):
        md_table(["a", "b"], [], "l")


def test_fmt_ci() -> None:
    assert fmt_ci(0.6924, (0.59, 0.7911)) == "0.692 [0.590, 0.791]"
    assert fmt_ci(3.5, None, 2) == "3.50"
    assert fmt_ci(None, None) == "–"


def test_pareto_table_sorts_by_score_and_marks_the_front() -> None:
    points = [
        ParetoPoint("userrl", 0.526, 0.376, pass_at_u=(0.244, 0.4, 0.5)),
        ParetoPoint("bao", 0.692, 0.215, (0.59, 0.79), (0.18, 0.25), (0.269, 0.5, 0.6), turns=5.25, num_episodes=78),
        ParetoPoint("noreg", 0.718, 0.906),
    ]
    text = pareto_markdown(points, pareto_front(points))
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[1] for r in rows] == ["noreg", "bao", "userrl"]
    assert rows[1] == "| ★ | bao | 0.692 [0.590, 0.790] | 0.215 [0.180, 0.250] | 0.269 | 0.600 | 5.25 | 78 |"
    assert rows[2].startswith("|  | userrl | 0.526 | 0.376 | 0.244 | 0.500 |")
    assert rows[0].startswith("| ★ | noreg |") and "| – | – |" in rows[0]
    assert "Pass@U-1 | Pass@U-3 |" in text and "Pass@U-5" not in text  # no curve reaches k = 5


def test_pareto_legend_states_weak_dominance() -> None:
    # equal Score, higher UR: dominated, although no run has both a higher Score and a lower UR
    points = [ParetoPoint("a", 0.5, 0.2), ParetoPoint("b", 0.5, 0.3), ParetoPoint("a2", 0.5, 0.2)]
    front = pareto_front(points)
    assert [points[i].label for i in front] == ["a", "a2"]
    text = pareto_markdown(points, front)
    assert "no other run has Score ≥ and UR ≤ this run's with at least one strictly better" in text
    assert "higher Score and lower UR" not in text


def test_summary_markdown_of_hand_built_episodes() -> None:
    episodes = [
        {"choices": ["action", "answer"], "rewards": [0.0, 1.0], "success": True},
        {"choices": ["search", "answer", "answer", "answer"], "rewards": [0.0, 0.0, 0.0, 1.0], "success": True},
        {"choices": ["action", "invalid"], "rewards": [0.0, 0.0], "success": False},
        {"choices": ["answer"], "rewards": [0.0], "success": False},
    ]
    summary = {
        "label": "hand",
        "gym": "function",
        "end_reasons": {"correct": 2, "no_tool_call": 2},
        **summarize(episodes),
    }
    via_json = json.loads(json.dumps(summary))  # int k keys become strings on disk; both must render
    for s in (summary, via_json):
        text = summary_markdown(s)
        assert text.startswith("# hand\n\n4 episodes, gym function\n")
        assert "| Score | 0.500 [" in text and "| UR | 0.562 [" in text  # UR = (1/2 + 3/4 + 0 + 1) / 4
        assert "| 1 | 0.250 [" in text and "| 3 | 0.500 [" in text  # Pass@U-1, Pass@U-3
        assert "| answer | 5 | 0.556 |" in text and "| invalid | 1 | 0.111 |" in text  # of 9 turns
        assert "| no_tool_call | 2 |" in text
