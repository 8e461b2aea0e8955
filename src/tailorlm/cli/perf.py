"""``tailorlm perf``: benchmarks measured on this machine, side by side with the alternatives."""

from __future__ import annotations

import typer
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
    train_repeats: int = typer.Option(3, min=1, help="Timed rounds of the training comparison."),
    load_samples: int = typer.Option(200, min=1, help="Timed loads per store size."),
    only: list[str] | None = typer.Option(
        None,
        "--only",
        help="Sections to run, repeated or comma separated: lora, ia3, prompt, bottleneck, train, load, "
        "bytes (default: all).",
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Mixed-user batches vs the bare base model and PEFT, multi-user training vs stock PEFT, cold loads
    vs raw reads, and bytes per user at rest, each against its target."""
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


def render(payload: dict) -> None:
    console.out.print(
        f"tailorlm perf engine: model {payload['model']}, {payload['threads']} torch threads on "
        f"{payload['cores']} cores, torch {payload['torch']}",
        highlight=False,
    )
    for section in payload["sections"]:
        grid = Table(title=section["title"], title_justify="left")
        for column in ("measured", "resident", "median", "min .. max", "runs", "ratio", "target", "result"):
            grid.add_column(column)
        for timing in section["timings"]:
            median = _duration(timing["median_s"])
            if timing["per_second"] is not None:
                median += f" ({timing['per_second']:.2f} ex/s)"
            grid.add_row(
                timing["name"],
                console.fmt(timing["resident"]),
                median,
                f"{_duration(timing['min_s'])} .. {_duration(timing['max_s'])}",
                str(timing["runs"]),
                "",
                "",
                "",
            )
        for row in section["facts"].get("modules", []):
            grid.add_row(
                row["module"],
                "",
                f"{row['bytes_fp16']:,} B fp16",
                f"{row['bytes_fp32']:,} B fp32",
                "",
                "",
                "",
                "",
            )
        if section["checks"]:
            grid.add_section()
        for check in section["checks"]:
            verdict = "[green]PASS[/]" if check["passed"] else "[red]MISS[/]"
            grid.add_row(check["label"], "", "", "", "", _ratio(check), _target(check), verdict)
        console.out.print(grid)
        for note in section["notes"]:
            console.out.print(f"  note: {note}", style="dim", highlight=False)
    console.out.print(
        f"{payload['passed']} targets passed, {payload['missed']} missed; peak RSS "
        f"{payload['peak_rss_mb']:.0f} MB; {payload['total_seconds']:.0f} s in all.",
        highlight=False,
    )
