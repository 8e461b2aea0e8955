"""Pieces every command shares: the --json and --model options and turning user mistakes into messages."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer

from tailorlm.cli import console

JSON_OPTION = typer.Option(False, "--json", help="Print the figures as one JSON object on stdout.")
MODEL_OPTION = typer.Option(
    None,
    "--model",
    "-m",
    help="Base model: 'smollm2-135m-instruct' (default, offline), a local model folder, or a hub id.",
)


DEVICE_OPTION = typer.Option(
    None,
    "--device",
    help="Where to compute: auto (default: the GPU when present, else cpu), cpu, cuda[:N], mps.",
)
DTYPE_OPTION = typer.Option(
    None, "--dtype", help="Compute precision: fp32 (default; fastest on CPUs), bf16 or fp16 (for GPUs)."
)


class UserError(Exception):
    """A mistake in what the user asked for; shown as one line, never as a traceback."""


@contextlib.contextmanager
def user_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Show the listed exception kinds (and UserError) as `error: ...` with exit code 2."""
    try:
        yield
    except (UserError, *kinds) as error:
        console.err.print(f"[bold red]error:[/] {error}", markup=True, highlight=False)
        raise typer.Exit(2) from None
