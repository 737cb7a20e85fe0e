"""Markdown tables: the Pareto table, one evaluation's summary and the benchmark report.

``pareto_markdown(points, front)`` ranks evaluated policies; ``summary_markdown(summary)`` details one
evaluation. ``benchmark_report(records)`` renders the
JSON records of ``benchmarks/results/`` (``benchmarks/common.py: write_results``): device and versions,
record-wide settings, a step breakdown when the record has ``phases``, and one table per shape of its
per-implementation rows (``results`` or ``rows``: ``{"impl", "median_ms", ...}``, or ``{"impl",
"skipped"}``) with the ratio of every row to every other implementation measured in the same run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bao_fast.eval.pareto import ParetoPoint


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A GitHub markdown table. ``align`` holds one of ``l``/``r`` per column (default: all left)."""
    if any(len(r) != len(header) for r in rows):
        raise ValueError(f"rows: every row needs {len(header)} cells")
    align = align or "l" * len(header)
    if len(align) != len(header):
        raise ValueError(f"align: needs {len(header)} characters, got {align!r}")

    def cell(v: object) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |"]
    lines.append("|" + "|".join("---:" if a == "r" else ":---" for a in align) + "|")
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def fmt_ci(value: float | None, ci: tuple[float, float] | None, digits: int = 3) -> str:
    """``0.692 [0.590, 0.790]``; ``–`` for a missing value."""
    if value is None:
        return "–"
    text = f"{value:.{digits}f}"
    if ci is not None:
        text += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return text


def pareto_markdown(points: Sequence[ParetoPoint], front: Sequence[int], ks: Sequence[int] = (1, 3, 5, 9)) -> str:
    """Table of every point sorted by Score (95% CIs in brackets), front members marked ``★``, with
    Pass@U-k at ``ks`` (those no point has are dropped)."""
    on_front = set(front)
    max_k = max((len(p.pass_at_u) for p in points), default=0)
    ks = [k for k in ks if k <= max_k]
    header = ["", "run", "Score", "UR", *(f"Pass@U-{k}" for k in ks), "turns", "episodes"]
    order = sorted(range(len(points)), key=lambda i: (-points[i].score, points[i].ur))
    rows = []
    for i in order:
        p = points[i]
        passes = [f"{p.pass_at_u[k - 1]:.3f}" if k <= len(p.pass_at_u) else "–" for k in ks]
        rows.append(
            [
                "★" if i in on_front else "",
                p.label,
                fmt_ci(p.score, p.score_ci),
                fmt_ci(p.ur, p.ur_ci),
                *passes,
                "–" if p.turns is None else f"{p.turns:.2f}",
                "–" if p.num_episodes is None else p.num_episodes,
            ]
        )
    title = (
        "# Pareto frontier: Score ↑ vs UR ↓\n\n★ = not dominated: no other run has Score ≥ and UR ≤ this run's "
        "with at least one strictly better (exact ties are all starred).\n\n"
    )
    return title + md_table(header, rows, "ll" + "r" * (len(header) - 2))


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """One evaluation summary (``bao-fast eval``'s ``summary.json``): headline metrics with 95% CIs,
    Pass@U-k for every k, and how the turns and episodes were spent."""
    label = summary.get("label") or summary.get("model") or "evaluation"
    ci = summary.get
    head = [
        ["Score", fmt_ci(summary["score"], ci("score_ci"))],
        ["UR", fmt_ci(summary["ur"], ci("ur_ci"))],
        ["turns", fmt_ci(summary["turns"], ci("turns_ci"), 2)],
    ]
    if "success_rate" in summary:
        head.insert(1, ["success rate", fmt_ci(summary["success_rate"], ci("success_rate_ci"))])
    if "answers" in summary:
        head.append(["answers / episode", f"{summary['answers']:.2f}"])
    lines = [f"# {label}", ""]
    facts = [f"{summary.get('num_episodes', '?')} episodes"]
    for key in ("gym", "split", "num_tasks", "engine"):
        if summary.get(key) is not None:
            facts.append(f"{key} {summary[key]}")
    lines += [", ".join(facts), "", md_table(["metric", "value [95% CI]"], head, "lr").rstrip()]
    pass_at_u = summary.get("pass_at_u") or {}
    if pass_at_u:
        ks = sorted(pass_at_u, key=int)
        cis = summary.get("pass_at_u_ci") or {}
        rows = [[k, fmt_ci(pass_at_u[k], cis.get(k))] for k in ks]
        lines += ["", md_table(["k", "Pass@U-k [95% CI]"], rows, "rr").rstrip()]
    counts = summary.get("choice_counts") or {}
    if counts:
        fractions = summary.get("choice_fractions") or {}
        rows = [[c, n, f"{fractions.get(c, 0.0):.3f}"] for c, n in counts.items()]
        lines += ["", md_table(["choice", "turns", "fraction"], rows, "lrr").rstrip()]
    reasons = summary.get("end_reasons") or {}
    if reasons:
        lines += ["", md_table(["episode end", "episodes"], [[r, n] for r, n in reasons.items()], "lr").rstrip()]
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------ benchmarks

DEVICE_KEYS: tuple[str, ...] = (
    "op",
    "device",
    "device_name",
    "cpu_threads",
    "cpu_count",
    "torch",
    "cuda",
    "triton",
    "python",
    "_file",
)
"""Keys ``benchmarks/common.py`` merges into every record (plus the file name the loader adds)."""
ROW_LISTS: tuple[str, ...] = ("results", "rows")
"""Where a record keeps its per-implementation rows."""
IMPL_KEYS: tuple[str, ...] = ("impl", "engine", "method")
"""The field naming a row's implementation (the first one present)."""
TIME_KEYS: dict[str, float] = {"median_ms": 1.0, "median_s": 1e3}
"""Median-time fields and their factor to milliseconds."""
NOT_SHAPE_KEYS = frozenset({*IMPL_KEYS, "device", "repeats", "warmup", "skipped"})


def _num(v: float) -> str:
    if v == 0 or 1e-3 <= abs(v) < 1e5:
        return f"{v:.4g}"
    return f"{v:.2e}"


def _is_float(v: object) -> bool:
    return isinstance(v, float)


def _is_peak_key(key: str) -> bool:
    low = key.lower()
    return low.startswith("peak") and (low.endswith("mb") or low.endswith("bytes"))


def _peak_mib(row: Mapping[str, Any]) -> float | None:
    for key, value in row.items():
        if _is_peak_key(key) and isinstance(value, int | float) and not isinstance(value, bool):
            return value / 2**20 if key.lower().endswith("bytes") else float(value)
    return None


def _is_derived(key: str) -> bool:
    """Fields the report shows in its own columns (time, speed-up ratios, peak memory) or leaves out (spread);
    other ratios (``mem_vs_eager``, ``max_abs_diff_vs_padded``) are measurements of their own and stay."""
    return (
        key in TIME_KEYS
        or key in ("min_ms", "max_ms", "min_s", "max_s")
        or key.startswith("speedup")
        or _is_peak_key(key)
    )


def _impl(row: Mapping[str, Any]) -> str:
    return str(next(row[k] for k in IMPL_KEYS if k in row))


def _median_ms(row: Mapping[str, Any]) -> float | None:
    for key, factor in TIME_KEYS.items():
        value = row.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value) * factor
    return None


def _rows_of(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    for key in ROW_LISTS:
        rows = record.get(key)
        if (
            isinstance(rows, list)
            and rows
            and all(isinstance(r, dict) and any(k in r for k in IMPL_KEYS) for r in rows)
        ):
            return rows
    raise ValueError(
        f"{record.get('_file', record.get('op', 'record'))}: no per-implementation rows (a list of dicts with "
        f"one of {list(IMPL_KEYS)} and {' or '.join(TIME_KEYS)}, under one of {list(ROW_LISTS)})"
    )


def _shape_fields(row: Mapping[str, Any]) -> list[str]:
    """A row's fields that can describe its case: int, str and bool (a flag such as ``causal``) values."""
    return [k for k, v in row.items() if k not in NOT_SHAPE_KEYS and isinstance(v, int | str) and not _is_derived(k)]


def _split_at_repeats(group: list[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """``group`` cut before every row whose implementation it already holds: rows its fields cannot tell
    apart (a float parameter) are cases in the order they were written, never two rows of one table."""
    parts: list[list[Mapping[str, Any]]] = [[]]
    for r in group:
        if any(_impl(q) == _impl(r) for q in parts[-1]):
            parts.append([])
        parts[-1].append(r)
    return parts


def split_cases(rows: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """Group rows into shapes: by the fewest of their int/str/bool fields that still leave one row per
    implementation in each group (fields are dropped last-first, so outcomes such as a token count are
    dropped before the shape that comes first in a row). Groups keep the order of first appearance; rows
    those fields cannot tell apart are split in written order (:func:`_split_at_repeats`)."""
    fields = list(dict.fromkeys(k for r in rows for k in _shape_fields(r)))

    def unique(keys: list[str]) -> bool:
        seen = {(tuple(r.get(k) for k in keys), _impl(r)) for r in rows}
        return len(seen) == len(rows)

    keys = list(fields)
    for field in reversed(fields):
        if unique([k for k in keys if k != field]):
            keys.remove(field)
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    return [part for group in groups.values() for part in _split_at_repeats(group)]


def case_table(rows: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """One shape: ``(heading, table)``. The heading lists the int/str fields all rows share; the table
    has the median ms, then ``× <impl>`` = that implementation's median / this row's (> 1: this row is
    faster) for every implementation timed, peak memory, and the remaining per-row fields."""
    timed = [r for r in rows if _median_ms(r) is not None]
    base_ms = {_impl(r): _median_ms(r) for r in timed}
    fields = list(dict.fromkeys(k for r in rows for k in _shape_fields(r)))
    shared = [k for k in fields if all(k in r for r in rows) and len({r[k] for r in rows}) == 1]
    varying = [k for k in fields if k not in shared]
    extras = varying + list(
        dict.fromkeys(
            k for r in timed for k, v in r.items() if _is_float(v) and not _is_derived(k) and k not in NOT_SHAPE_KEYS
        )
    )
    header = ["impl", "median ms", *(f"× {b}" for b in base_ms), "peak MiB", *extras]
    out_rows = []
    for r in rows:
        ms = _median_ms(r)
        if ms is None:
            reason = r.get("skipped", "no timing")
            out_rows.append([_impl(r), f"skipped: {reason}", *([""] * (len(header) - 2))])
            continue
        ratios = ["1" if b == _impl(r) else (f"{b_ms / ms:.2f}" if ms > 0 else "–") for b, b_ms in base_ms.items()]
        peak = _peak_mib(r)
        cells = [(_num(r[k]) if _is_float(r[k]) else str(r[k])) if r.get(k) is not None else "–" for k in extras]
        out_rows.append([_impl(r), _num(ms), *ratios, "–" if peak is None else _num(peak), *cells])
    heading = ", ".join(f"{k}={rows[0][k]}" for k in shared)
    return heading, md_table(header, out_rows, "l" + "r" * (len(header) - 1))


def _phase_table(phases: Sequence[dict]) -> str:
    rows = [[p["phase"], _num(float(p["median_ms"])), f"{100 * float(p.get('share', 0.0)):.1f}%"] for p in phases]
    return md_table(["phase", "median ms", "share of step"], rows, "lrr")


def _meta_line(record: dict) -> str:
    parts = [f"device `{record.get('device', '?')}` ({record.get('device_name', '?')})"]
    for key, name in (("torch", "torch"), ("triton", "triton"), ("cuda", "CUDA"), ("python", "python")):
        if record.get(key):
            parts.append(f"{name} {record[key]}")
    if record.get("cpu_threads"):
        parts.append(f"{record['cpu_threads']} CPU threads")
    return ", ".join(parts)


def _settings_lines(record: dict) -> list[str]:
    """Record-wide shape, dtype and other settings, one bullet each."""
    lines = []
    for key, value in record.items():
        if key in DEVICE_KEYS or key in ROW_LISTS or key == "phases":
            continue
        if isinstance(value, dict) and all(not isinstance(v, dict | list) for v in value.values()):
            value = ", ".join(f"{k}={_num(v) if _is_float(v) else v}" for k, v in value.items())
        elif isinstance(value, dict | list):
            continue
        elif _is_float(value):
            value = _num(value)
        lines.append(f"- {key}: {value}")
    return lines


def benchmark_section(record: dict) -> str:
    """Markdown of one results record: device and versions, settings, one table per shape."""
    rows = _rows_of(record)
    title = f"## {record.get('op', '?')} on {record.get('device_name') or record.get('device', '?')}"
    parts = [title, "", _meta_line(record), "", *_settings_lines(record)]
    if isinstance(record.get("phases"), list) and record["phases"]:
        parts += ["", "Step breakdown:", "", _phase_table(record["phases"]).rstrip()]
    for case_rows in split_cases(rows):
        heading, table = case_table(case_rows)
        parts.append("")
        if heading:
            parts += [f"Shape {heading}:", ""]
        parts.append(table.rstrip())
    return "\n".join(parts) + "\n"


def benchmark_report(records: Sequence[dict]) -> str:
    """The whole report: an index of the results files, then one section per record. Ratios ``× B`` are
    B's median time over the row's, measured in the same run (> 1: faster than B)."""
    if not records:
        raise ValueError("records: no benchmark results to render")
    index = [
        [
            r.get("op", "?"),
            r.get("device_name") or r.get("device", "?"),
            r.get("torch", "–"),
            r.get("triton") or "–",
            f"`{r.get('_file', '')}`",
        ]
        for r in records
    ]
    head = [
        "# Benchmark report",
        "",
        "Generated by `bao-fast bench` from `benchmarks/results/*.json`. Times are medians of timed repeats after",
        "warm-up; `× B` is B's median over the row's (> 1 means faster than B), measured in the same run.",
        "Absolute times count only on a GPU; on a CPU compare the ratios.",
        "",
        md_table(["op", "device", "torch", "triton", "file"], index).rstrip(),
    ]
    return "\n".join(head) + "\n\n" + "\n".join(benchmark_section(r) for r in records)
