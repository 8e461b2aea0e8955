"""The ``tailorlm`` command line. Each command group lives in its own module and registers itself here."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="tailorlm",
    help="Personalize one shared language model with a small private PEFT module per user.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

from tailorlm.cli import bench, data, export, perf, report, serve, system, users  # noqa: E402, F401  (modules register their commands on `app`)

__all__ = ["app", "main"]


def main() -> None:
    app()
