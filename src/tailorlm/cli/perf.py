"""``tailorlm perf``: benchmarks measured on this machine, side by side with the alternatives."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.table import Table

from tailorlm import console, models
from tailorlm.cli import app
from tailorlm.cli.common import JSON_OPTION, UserError, user_errors

perf_app = typer.Typer(
    help="Measure tailorlm on this machine, side by side with the alternatives.", no_args_is_help=True
)
app.add_typer(perf_app, name="perf")


@perf_app.command("engine")
def engine_command(
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Base model: the default SmolLM2-135M-Instruct, 'tiny' (a tiny random model, for a smoke "
        "run), a local model folder or a hub id.",
    ),
    resident: int = typer.Option(1000, min=1, help="Users resident in the bank during mixed batches."),
    users_per_batch: int = typer.Option(8, min=1, help="Distinct users in one mixed batch / training step."),
    repeats: int = typer.Option(5, min=1, help="Timed rounds per forward comparison (after a warm-up)."),
    tokens: int = typer.Option(128, min=8, help="Prompt length in tokens of the longest row of a batch."),
    decode_tokens: int = typer.Option(32, min=1, help="New tokens per row in the generation comparison."),
    train_repeats: int = typer.Option(3, min=1, help="Timed rounds of the training comparison."),
    load_samples: int = typer.Option(200, min=1, help="Timed loads per store size."),
    only: list[str] | None = typer.Option(
        None,
        "--only",
        help="Sections to run, repeated or comma separated: lora, decode, ia3, prompt, bottleneck, train, "
        "load, bytes (default: all).",
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Mixed-user batches (forward and generation) vs the bare base model and PEFT, multi-user training vs
    stock PEFT, cold loads vs raw reads, and bytes per user at rest, each against its target."""
    from tailorlm.bench import engine_perf

    with user_errors(models.ModelNotFoundError, ValueError):
        sections = engine_perf.parse_sections(only)
        if resident < users_per_batch:
            raise UserError(f"--resident ({resident}) must be at least --users-per-batch ({users_per_batch})")
        config = engine_perf.PerfConfig(
            model=model,
            resident=resident,
            users_per_batch=users_per_batch,
            repeats=repeats,
            tokens=tokens,
            decode_tokens=decode_tokens,
            train_repeats=train_repeats,
            load_samples=load_samples,
        )
        payload = engine_perf.run_benchmark(
            config, sections, log=lambda message: console.err.print(message, highlight=False)
        )
    console.emit(payload, as_json, render)


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _ratio(check: dict) -> str:
    if check["unit"] == "B":
        return f"{check['value']:,.0f} B"
    return f"{check['value']:.2f}x"


def _target(check: dict) -> str:
    target = f"{check['target']:,.0f} B" if check["unit"] == "B" else f"{check['target']:g}x"
    return f"{check['direction']} {target}"


_TIMING_COLUMNS = ("measured", "resident", "median", "min .. max", "runs")
_BYTES_COLUMNS = ("module", "numbers per user", "fp16 at rest", "fp32 at rest", "fp16 weights file")


def _section_table(section: dict) -> Table:
    """Measured rows first (timings, or the bytes of each module kind), then each check with its ratio,
    target and verdict in the last three columns."""
    modules = section["facts"].get("modules")
    columns = _BYTES_COLUMNS if modules else _TIMING_COLUMNS
    grid = Table(title=section["title"], title_justify="left")
    for column in (*columns, "ratio", "target", "result"):
        grid.add_column(column)
    blank = ("", "", "")
    for timing in section["timings"]:
        median = _duration(timing["median_s"])
        if timing["per_second"] is not None:
            median += f" ({timing['per_second']:.2f} ex/s)"
        spread = f"{_duration(timing['min_s'])} .. {_duration(timing['max_s'])}"
        grid.add_row(
            timing["name"], console.fmt(timing["resident"]), median, spread, str(timing["runs"]), *blank
        )
    for row in modules or []:
        sizes = (f"{row[key]:,} B" for key in ("bytes_fp16", "bytes_fp32", "weights_bytes_fp16"))
        grid.add_row(row["module"], f"{row['numbers']:,}", *sizes, *blank)
    if section["checks"]:
        grid.add_section()
    for check in section["checks"]:
        verdict = "[green]PASS[/]" if check["passed"] else "[red]MISS[/]"
        grid.add_row(check["label"], *[""] * (len(columns) - 1), _ratio(check), _target(check), verdict)
    return grid


def render(payload: dict) -> None:
    # Redirected to a file, rich would wrap the tables at 80 columns.
    out = console.out if console.out.is_terminal else Console(file=sys.stdout, width=150, soft_wrap=True)
    out.print(
        f"tailorlm perf engine: model {payload['model']}, {payload['threads']} torch threads on "
        f"{payload['cores']} cores, torch {payload['torch']}",
        highlight=False,
    )
    for section in payload["sections"]:
        grid = _section_table(section)
        out.print(grid)
        for note in section["notes"]:
            out.print(f"  note: {note}", style="dim", highlight=False)
        load = section["facts"].get("load_average_1min")
        if load:
            out.print(
                f"  machine load average (1 min) before/after: {load[0]:.1f} / {load[1]:.1f}",
                style="dim",
                highlight=False,
            )
    out.print(
        f"{payload['passed']} targets passed, {payload['missed']} missed; peak RSS "
        f"{payload['peak_rss_mb']:.0f} MB; {payload['total_seconds']:.0f} s in all.",
        highlight=False,
    )
