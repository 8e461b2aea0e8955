"""The printed form of a ``tailorlm perf engine`` payload: per section a table of timings and checks
(ratio, target, verdict), its fact tables, notes, and one line of what the machine did. ``--json``
prints the payload itself; this module only formats it."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from tailorlm.cli import console

_TIMING_COLUMNS = ("measured", "resident", "median", "min .. max", "runs")


def duration(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _value(check: dict) -> str:
    return f"{check['value']:,.0f} B" if check["unit"] == "B" else f"{check['value']:.2f}x"


def _target(check: dict) -> str:
    target = f"{check['target']:,.0f} B" if check["unit"] == "B" else f"{check['target']:g}x"
    return f"{check['direction']} {target}"


def cell(value: Any) -> str:
    """A fact-table cell: thousands separators for whole numbers, 3 significant figures for fractions."""
    if isinstance(value, bool) or value is None:
        return console.fmt(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def section_table(section: dict) -> Table:
    """Timings first, then each check with its ratio, target and verdict in the last three columns."""
    grid = Table(title=section["title"], title_justify="left")
    for column in (*_TIMING_COLUMNS, "ratio", "target", "result"):
        grid.add_column(column)
    blank = ("", "", "")
    for timing in section["timings"]:
        median = duration(timing["median_s"])
        if timing["per_second"] is not None:
            median += f" ({timing['per_second']:.2f} ex/s)"
        spread = f"{duration(timing['min_s'])} .. {duration(timing['max_s'])}"
        grid.add_row(
            timing["name"], console.fmt(timing["resident"]), median, spread, str(timing["runs"]), *blank
        )
    if section["timings"] and section["checks"]:
        grid.add_section()
    for check in section["checks"]:
        verdict = "[green]PASS[/]" if check["passed"] else "[red]MISS[/]"
        grid.add_row(
            check["label"], *[""] * (len(_TIMING_COLUMNS) - 1), _value(check), _target(check), verdict
        )
    return grid


def fact_table(table: dict) -> Table:
    grid = Table(title=table["title"], title_justify="left")
    for column in table["columns"]:
        grid.add_column(column)
    for row in table["rows"]:
        grid.add_row(*[cell(value) for value in row])
    return grid


def machine_line(facts: dict) -> str | None:
    parts = []
    load = facts.get("load_average_1min")
    if load:
        parts.append(f"load average (1 min) before/after {load[0]:.1f} / {load[1]:.1f}")
    if facts.get("cpu_busy") is not None:
        parts.append(f"threads busy {facts['cpu_busy']:.0%}")
    if "rss_mb_peak" in facts:
        parts.append(
            f"peak RSS {facts['rss_mb_peak']:,.0f} MB (+{facts['rss_mb_peak_increase']:,.0f} MB over the "
            f"section's start)"
        )
    if "section_seconds" in facts:
        parts.append(f"{facts['section_seconds']:.0f} s")
    return "  machine: " + "; ".join(parts) if parts else None


def render(payload: dict, out: Console | None = None) -> None:
    # Redirected to a file, rich would wrap the tables at 80 columns.
    if out is None:
        out = console.out if console.out.is_terminal else Console(width=160, soft_wrap=True)
    out.print(
        f"tailorlm perf engine: model {payload['model']} on {payload.get('device', 'cpu')}, "
        f"dtypes {', '.join(payload.get('dtypes', []))}, {payload['threads']} torch threads on "
        f"{payload['cores']} cores, torch {payload['torch']}",
        highlight=False,
    )
    for section in payload["sections"]:
        if section["timings"] or section["checks"]:
            out.print(section_table(section))
        else:
            out.print(section["title"], style="italic", highlight=False)
        for table in section.get("tables", []):
            out.print(fact_table(table))
        for note in section["notes"]:
            out.print(f"  note: {note}", style="dim", highlight=False)
        line = machine_line(section["facts"])
        if line:
            out.print(line, style="dim", highlight=False)
    out.print(
        f"{payload['passed']} targets passed, {payload['missed']} missed; peak RSS "
        f"{payload['peak_rss_mb']:,.0f} MB ({payload.get('rss_method', 'high-water mark')}); "
        f"{payload['total_seconds']:.0f} s in all.",
        highlight=False,
    )


SERVE_COLUMNS = (
    "run",
    "contender",
    "users",
    "popularity",
    "arrival",
    "ok",
    "errors",
    "req/s",
    "tok/s",
    "TTFT p50",
    "TTFT p90",
    "latency p50",
    "latency p95",
    "mean batch",
    "slot loads",
    "peak RSS MB",
    "dtype",
    "clients",
    "between tokens p50",
)


def render_serve(payload: dict, out: Console | None = None) -> None:
    """``perf serve``: one row per run, then the ratios against their targets."""
    out = out or Console(width=260, soft_wrap=True)  # nineteen columns: wider than any terminal's default
    rows = [
        (
            r["name"],
            r["contender"],
            r["users"],
            r["popularity"],
            r["arrival"],
            r["ok"],
            r["errors"],
            r["requests_per_s"],
            r["tokens_per_s"],
            r["ttft_p50"],
            r["ttft_p90"],
            r["latency_p50"],
            r["latency_p95"],
            r["mean_batch"],
            r["slot_loads"],
            r["peak_rss_mb"],
            r.get("dtype"),
            r.get("clients"),
            r.get("between_tokens_p50"),
        )
        for r in payload["runs"]
    ]
    if "device" in payload:
        out.print(
            f"servers on {payload['device']}, default dtype {payload['dtype']} ({payload['dtype_reason']})",
            highlight=False,
        )
    out.print(console.table("Serving under load (seconds for times)", SERVE_COLUMNS, rows))
    for run in payload["runs"]:
        for note in run.get("notes", []):
            out.print(f"  {run['name']}: {note}", highlight=False)
    targets = [
        (t["what"], t["measured"], t["target"], "met" if t["passed"] else "MISSED")
        for t in payload["targets"]
    ]
    out.print(console.table("Targets", ("figure", "measured", "target", ""), targets))
    out.print(f"{payload['passed']} met, {payload['missed']} missed, in {duration(payload['total_seconds'])}")


SCALE_COLUMNS = [
    "question",
    "backend",
    "workers / replicas",
    "seconds",
    "done",
    "rate",
    "speed-up vs local",
    "load before / after",
]


def render_scale(payload: dict, out: Console | None = None) -> None:
    """``perf scale``: training and serving, local beside Ray, each rate with its speed-up."""
    out = out or Console(width=160, soft_wrap=True)
    rows = [
        (
            "users trained / hour" if r["what"] == "train" else "requests / s",
            r["backend"],
            r["workers"],
            r["seconds"],
            r["count"] if not r["errors"] else f"{r['count']} ({r['errors']} errors)",
            r["rate"],
            None if r["speedup"] is None else f"{r['speedup']:.2f}x",
            " / ".join(f"{x:.1f}" for x in r.get("load_average") or []),
        )
        for r in payload["runs"]
    ]
    title = (
        f"Scaling on this machine ({payload['cores']} cores, {payload['model']}); "
        f"the Ray instance took {payload['ray_start_seconds']:.1f} s to start (not counted)"
    )
    out.print(console.table(title, SCALE_COLUMNS, rows))
