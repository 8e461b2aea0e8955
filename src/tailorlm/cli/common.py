"""Pieces every command shares: the --json and --model options and turning user mistakes into messages."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.markup import escape

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
    None,
    "--dtype",
    help="Compute precision of the frozen base: fp32 (default), auto (the faster of fp32 and bf16 as "
    "measured on this machine at the model's shapes, cached; see tailorlm doctor), bf16 or fp16. Users' "
    "modules stay fp32. Default from TAILORLM_DTYPE.",
)


BACKEND_OPTION = typer.Option(
    "local",
    "--backend",
    help="Where users' modules train: local (this process) or ray (Ray workers; "
    "pip install tailorlm\\[ray]).",
)
WORKERS_OPTION = typer.Option(
    None, "--workers", min=1, help="--backend ray: groups trained at once (default: the CPUs / threads)."
)
GROUP_USERS_OPTION = typer.Option(
    None,
    "--group-users",
    min=1,
    help="Users per training group (default 64): a worker's unit of work and of retry. The same grouping "
    "on both backends gives the same modules.",
)
RAY_ADDRESS_OPTION = typer.Option(
    None, "--ray-address", help="--backend ray: a running Ray cluster (default: start a local instance)."
)


class UserError(Exception):
    """A mistake in what the user asked for; shown as one line, never as a traceback."""


@contextlib.contextmanager
def user_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Show the listed exception kinds (and UserError) as `error: ...` with exit code 2."""
    try:
        yield
    except (UserError, *kinds) as error:
        # escaped: a message may hold brackets ("pip install tailorlm[ray]") that are not markup
        console.err.print(f"[bold red]error:[/] {escape(str(error))}", markup=True, highlight=False)
        raise typer.Exit(2) from None
