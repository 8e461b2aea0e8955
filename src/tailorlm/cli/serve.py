"""``tailorlm serve``: every user's own module behind one OpenAI-compatible server."""

from __future__ import annotations

from pathlib import Path

import typer

from tailorlm import kinds, settings
from tailorlm.cli import app, console
from tailorlm.cli.common import DEVICE_OPTION, DTYPE_OPTION, user_errors
from tailorlm.models import ModelNotFoundError
from tailorlm.serve.config import LOOPBACK, ServeConfig
from tailorlm.serve.scheduler import SchedulerConfig


@app.command("serve")
def serve_command(
    store: Path | None = typer.Option(
        None, "--store", help="The user store (default: $TAILORLM_STORE or stores/default)."
    ),
    host: str = typer.Option(LOOPBACK, "--host", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    model: str | None = typer.Option(None, "--model", "-m", help="Base model (default: the store's)."),
    kind: list[str] | None = typer.Option(
        None, "--kind", help="Also serve this module kind (repeatable); the store's kinds are always served."
    ),
    slots: int = typer.Option(16, "--slots", min=2, help="Resident modules per kind."),
    max_batch: int = typer.Option(16, "--max-batch", min=1, help="Rows decoded together."),
    wait_ms: float = typer.Option(
        10.0, "--wait-ms", min=0.0, help="Wait for more arrivals before a prefill."
    ),
    max_queue: int = typer.Option(256, "--max-queue", min=1, help="Waiting requests before 429."),
    max_context: int = typer.Option(2048, "--max-context", min=8, help="Prompt plus new tokens."),
    rate_limit: float | None = typer.Option(None, "--rate-limit", help="Requests per second per key."),
    retrieve: int = typer.Option(
        0, "--retrieve", min=0, help="Put the user's k most relevant history items before the prompt."
    ),
    retrain: bool = typer.Option(
        True, "--retrain/--no-retrain", help="Retrain a user when their history grows."
    ),
    device: str | None = DEVICE_OPTION,
    dtype: str | None = DTYPE_OPTION,
) -> None:
    """Serve the store's users: /v1/completions, /v1/chat/completions, /v1/models, user admin routes."""
    from tailorlm.serve.run import serve_forever  # FastAPI and uvicorn load only for this command

    with user_errors(ValueError, ModelNotFoundError, kinds.ModuleSpecError, OSError):
        for name in kind or []:
            kinds.get(name)
        config = ServeConfig(
            store=store or settings.default_store(),
            host=host,
            port=port,
            base_model=model,
            device=device,
            dtype=dtype,
            kinds=tuple(kind or ()),
            slots=slots,
            scheduler=SchedulerConfig(max_batch=max_batch, wait_ms=wait_ms, max_queue=max_queue),
            max_context=max_context,
            rate_limit=rate_limit,
            retrieve=retrieve,
            retrain=retrain,
        )
        if host != LOOPBACK:
            console.err.print(f"warning: listening on {host}, not only on this machine's loopback")
        console.err.print(f"serving {config.store} on http://{host}:{port} (Ctrl-C stops)")
        serve_forever(config)
