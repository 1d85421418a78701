"""Figures into tables: number formatting, ratios, the plain-text grids, the
``--compare-with`` table and the ``--json`` document.

A table row is a :class:`Row`: one figure of one scenario with a value per
side (``broker``/``naive``, ``new``/``old``, ...) and the direction that is
better, from which the ratio column and the ``better`` column follow.
"""

from __future__ import annotations

import json
import os
import platform
import resource
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import redis
from settings import SERVERS, Settings

# (label, better, value): one figure of a scenario's result; better is
# "lower" | "higher" | "" (informational).
Figure = tuple[str, str, Any]
# (key in the result, label, better)
Metric = tuple[str, str, str]
# (key in the result, label, expected value, better): the rows of a broker-only table
Expect = tuple[str, str, str, str]

MARGIN = 0.05  # a side "wins" a row only by more than this


@dataclass
class Row:
    scenario: str
    metric: str
    better: str  # "lower" | "higher" | "" (informational)
    values: dict[str, Any]


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v != v:  # NaN
        return "nan"
    if isinstance(v, int):
        return f"{v:,}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}" if v else "0"


def cell(v: Any) -> str:
    """:func:`fmt`, and lists of numbers as ``a/b/c``."""
    return "/".join(f"{x:,}" for x in v) if isinstance(v, list) else fmt(v)


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and v == v


def ratio_of(x: Any, y: Any, better: str) -> tuple[str, int]:
    """``x / y`` as text, and who wins by more than :data:`MARGIN`: 1 for ``x``,
    -1 for ``y``, 0 for neither or when the row has no direction."""
    if not is_number(x) or not is_number(y) or not y:
        return "-", 0
    r = x / y
    if not better or abs(r - 1) < MARGIN:
        return f"{r:.2f}", 0
    return f"{r:.2f}", 1 if (r < 1) == (better == "lower") else -1


def pair_cells(row: Row, a: str, b: str, over: str | None = None) -> tuple[str, ...]:
    """Scenario, metric, the values of sides ``a`` and ``b``, the ratio of side
    ``over`` (default ``a``) to the other, and the side that wins by > 5 %."""
    top = over or a
    bottom = b if top == a else a
    text, win = ratio_of(row.values.get(top), row.values.get(bottom), row.better)
    winner = {1: top, -1: bottom}.get(win, "")
    return (
        row.scenario,
        row.metric,
        cell(row.values.get(a)),
        cell(row.values.get(b)),
        text,
        winner,
    )


def print_grid(header: tuple[str, ...], body: Sequence[tuple[str, ...]], left: int = 2) -> None:
    """A plain-text table: the first ``left`` columns left-aligned, the rest right-aligned."""
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in body:
        print(line(r))


def rows_for(
    scenario: str, metrics: Sequence[Metric], results: dict[str, dict[str, Any]]
) -> list[Row]:
    """One row per metric, a value per server kind (``broker``, ``naive``)."""
    return [
        Row(scenario, label, better, {kind: results.get(kind, {}).get(key) for kind in SERVERS})
        for key, label, better in metrics
    ]


def print_table(rows: list[Row]) -> None:
    """The broker / naive table of the compared scenarios."""
    header = ("scenario", "metric", "broker", "naive", "ratio b/n", "better")
    print_grid(header, [pair_cells(r, "broker", "naive") for r in rows])


def print_expect(scenario: str, r: dict[str, Any], rows: Iterable[Expect]) -> None:
    """One broker-only result: a row per figure with its value and the expected value."""
    print_grid(
        (scenario, "metric", "value", "expect"),
        [(scenario, label, fmt(r.get(key)), expect) for key, label, expect, _ in rows],
    )


def figures_of(r: dict[str, Any], metrics: Iterable[Metric], prefix: str = "") -> list[Figure]:
    """The figures of ``metrics`` in the result ``r``, labels prefixed with ``prefix``."""
    return [(prefix + label, better, r.get(key)) for key, label, better in metrics]


def expect_figures(r: dict[str, Any], rows: Iterable[Expect]) -> list[Figure]:
    """The figures of the rows of a broker-only table."""
    return figures_of(r, [(key, label, better) for key, label, _, better in rows])


# -- --compare-with -----------------------------------------------------------------------


def compare_rows(scenario: str, new: list[Figure], old: list[Figure]) -> list[Row]:
    """New against old, figure by figure (the same scenario's figures, in the same order)."""
    return [
        Row(scenario, label, better, {"new": v, "old": o})
        for (label, better, v), (_, _, o) in zip(new, old, strict=True)
        if is_number(v) or is_number(o)
    ]


def print_comparison(rows: list[Row], checkout: Path) -> None:
    """The new / old table, then the figures where the old checkout was better by > 5 %."""
    body = [pair_cells(r, "new", "old") for r in rows]
    print_grid(("scenario", "figure", "new", "old", "ratio n/o", "better"), body)
    print(f"new = this checkout, old = {checkout}; ratio = new / old, from the same run")
    worse = [cells for cells in body if cells[-1] == "old"]
    directed = sum(1 for r in rows if r.better)
    print(f"old better by > {MARGIN:.0%} in {len(worse)} of {directed} directed figures")
    for cells in worse:
        print(f"  worse: {cells[0]} / {cells[1]}: {cells[2]} against {cells[3]} ({cells[4]})")


# -- the run as a whole -----------------------------------------------------------------------


def machine_info(redis_version: str, naive_mode: str) -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "redis_py": redis.__version__,
        "redis_server": redis_version,
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
        "naive_mode": naive_mode,
        "note": "server, load clients, redis-server and redis-benchmark share these CPUs",
    }


def write_json(
    path: Path,
    info: dict[str, Any],
    settings: Settings,
    raw: dict[str, dict[str, dict[str, Any]]],
    rows: list[Row],
    errors: list[str],
    compared: list[Row] | None,
) -> None:
    doc: dict[str, Any] = {
        "machine": info,
        "settings": asdict(settings),
        "results": raw,
        "rows": [asdict(r) for r in rows],
        "errors": errors,
    }
    if compared is not None:
        doc["compare"] = [asdict(r) for r in compared]
    path.write_text(json.dumps(doc, indent=2, default=str))


def print_ratios(
    title: str, a: dict[str, Any], b: dict[str, Any], keys: Iterable[tuple[str, str]]
) -> None:
    """One line per figure both sides have: ``<title>, <label>: b / a``."""
    for key, label in keys:
        x, y = a.get(key), b.get(key)
        if x and y:
            print(f"{title}, {label}: {y / x:.2f}")
