"""``tailorlm serve``: every user's own module behind one OpenAI-compatible server."""

from __future__ import annotations

import json
import shlex

import typer

from tailorlm import kinds, settings
from tailorlm.cli import app, console
from tailorlm.cli.common import DEVICE_OPTION, DTYPE_OPTION, RAY_ADDRESS_OPTION, user_errors
from tailorlm.cli.users import STORE_OPTION
from tailorlm.cluster.session import ClusterError, check_backend, import_ray
from tailorlm.models import ModelNotFoundError
from tailorlm.serve.config import LOOPBACK, ServeConfig
from tailorlm.serve.scheduler import SchedulerConfig


@app.command("serve")
def serve_command(
    store: str | None = STORE_OPTION,
    demo: int = typer.Option(
        0,
        "--demo",
        min=0,
        help="First make sure the store holds this many users of the demo task, trained (import and train "
        "what is missing), then print one user's fresh key with a curl and an openai example.",
    ),
    demo_task: str = typer.Option(
        "verbagg", "--demo-task", help="The bundled task --demo imports users from."
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
    max_user_queue: int = typer.Option(
        64, "--max-user-queue", min=1, help="Waiting requests of one user (model) before 429."
    ),
    max_context: int = typer.Option(2048, "--max-context", min=8, help="Prompt plus new tokens."),
    rate_limit: float | None = typer.Option(
        None, "--rate-limit", min=0.001, help="Requests per second per key (bursts of twice that)."
    ),
    auth_failure_rate: float = typer.Option(
        1.0,
        "--auth-failure-rate",
        min=0.001,
        help="Requests with a missing or bad key per second per client address (bursts of "
        "--auth-failure-burst); beyond, that address gets 429 before any key is looked up.",
    ),
    auth_failure_burst: float = typer.Option(20.0, "--auth-failure-burst", min=1.0),
    header_timeout: float = typer.Option(
        10.0, "--header-timeout", min=0.001, help="Seconds a client has to send a request's headers."
    ),
    body_timeout: float = typer.Option(
        30.0, "--body-timeout", min=0.001, help="Seconds a client has to send a request's whole body (408)."
    ),
    keep_alive: float = typer.Option(
        5.0, "--keep-alive", min=0.001, help="Seconds an idle kept-alive connection stays open."
    ),
    max_connections: int = typer.Option(
        512, "--max-connections", min=1, help="Connections held at once; beyond, new ones are closed."
    ),
    max_connections_per_client: int = typer.Option(
        64, "--max-connections-per-client", min=1, help="Connections held at once from one address."
    ),
    max_request_mb: int = typer.Option(
        1024,
        "--max-request-mb",
        min=1,
        help="A label request whose scoring needs more working memory than this (MiB) is refused (400).",
    ),
    watchdog_seconds: float = typer.Option(
        30.0,
        "--watchdog-seconds",
        min=0.001,
        help="With work pending, an engine loop that has not advanced for this long makes /health 503.",
    ),
    retrieve: int = typer.Option(
        0, "--retrieve", min=0, help="Put the user's k most relevant history items before the prompt."
    ),
    recipe: str = typer.Option(
        "plain",
        "--recipe",
        help="How a label request's item is asked: the store task's prompt under plain, bm25, dense, shots "
        "or profile (joined with +), as the benchmark asks it; none: the prompt as sent.",
    ),
    retrain: bool = typer.Option(
        True, "--retrain/--no-retrain", help="Retrain a user when their history grows."
    ),
    training_workers: int = typer.Option(
        1,
        "--training-workers",
        min=1,
        help="Retraining worker processes at once; queued users train together.",
    ),
    device: str | None = DEVICE_OPTION,
    dtype: str | None = DTYPE_OPTION,
    backend: str = typer.Option(
        "local",
        "--backend",
        help="local: this process serves; ray: --replicas engine replicas behind Ray Serve, each user's "
        "requests on one replica (pip install tailorlm\\[ray]).",
    ),
    replicas: int = typer.Option(2, "--replicas", min=1, help="--backend ray: engine replicas."),
    ray_address: str | None = RAY_ADDRESS_OPTION,
) -> None:
    """Serve the store's users: /v1/completions, /v1/chat/completions, /v1/models, user admin routes."""
    from tailorlm.serve.run import check_port, serve_forever  # FastAPI and uvicorn load only here

    with user_errors(ValueError, ModelNotFoundError, kinds.ModuleSpecError, OSError, ClusterError):
        if check_backend(backend) == "ray":
            import_ray()  # a missing extra is said before anything is prepared
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
            scheduler=SchedulerConfig(
                max_batch=max_batch,
                wait_ms=wait_ms,
                max_queue=max_queue,
                max_user_queue=max_user_queue,
                watchdog_seconds=watchdog_seconds,
            ),
            max_context=max_context,
            rate_limit=rate_limit,
            auth_failure_rate=auth_failure_rate,
            auth_failure_burst=auth_failure_burst,
            header_timeout=header_timeout,
            body_timeout=body_timeout,
            keep_alive=keep_alive,
            max_connections=max_connections,
            max_connections_per_client=max_connections_per_client,
            max_request_bytes=max_request_mb << 20,
            retrieve=retrieve,
            recipe=recipe,
            retrain=retrain,
            training_workers=training_workers,
        )
        check_port(host, port)
        if demo:
            _prepare_demo(config, demo, demo_task)
        if host != LOOPBACK:
            console.err.print(f"warning: listening on {host}, not only on this machine's loopback")
        if backend == "ray":
            from tailorlm.cluster import serving

            console.err.print(
                f"serving {config.store} from {replicas} replicas on Ray Serve, http://{host}:{port} "
                "(Ctrl-C stops)"
            )
            serving.serve_forever(config, replicas, ray_address)
            return
        console.err.print(f"serving {config.store} on http://{host}:{port} (Ctrl-C stops)")
        serve_forever(config)


def _prepare_demo(config: ServeConfig, users: int, task: str) -> None:
    """A small ready store: ``users`` users of ``task`` imported and trained (only what is missing), a
    fresh key for the first one (keys are stored hashed, so a printed key is always a new one), and
    examples that work as printed."""
    from tailorlm.users.errors import UserError
    from tailorlm.users.service import UserService

    service = UserService(config.store, device=config.device, dtype=config.dtype)
    try:
        if config.base_model is not None:
            service.configure(base_model=config.base_model)
        if len(service.store.index.user_ids() if service.exists() else []) < users:
            service.import_task(task, users=users)
        reporter = console.ConsoleReporter()
        outcome = service.train(on_progress=reporter.progress(f"training the demo users of {task}"))
        if outcome.trained:
            reporter.log(f"trained {len(outcome.trained)} users into {config.store}")
        user = sorted(service.store.users())[0]
        service.revoke_keys(user)  # the demo's earlier keys for this user stop working
        key = service.issue_key(user, label="make serve")
        example = next((r.input for r in service.history(user) if r.split == "train"), "Hello")
        labels = list(service.settings().labels or ())
    except UserError as error:
        raise UserError(f"preparing the demo store failed: {error}") from None
    finally:
        service.close()
    _print_examples(f"http://{config.host}:{config.port}", user, key, example, labels)


def _print_examples(url: str, user: str, key: str, example: str, labels: list[str]) -> None:
    chat = {"model": user, "messages": [{"role": "user", "content": example[:300]}], "max_tokens": 24}
    lines = [
        f"user {user!r}, key (shown once): {key}",
        "",
        "# chat with this user's own model:",
        f"curl -s {url}/v1/chat/completions -H 'Authorization: Bearer {key}' "
        f"-H 'Content-Type: application/json' -d {shlex.quote(json.dumps(chat))}",
    ]
    if labels:
        labelled = {"model": user, "prompt": example[:300], "labels": labels}
        lines += [
            "",
            "# this user's label for an item, with every label's score:",
            f"curl -s {url}/v1/completions -H 'Authorization: Bearer {key}' "
            f"-H 'Content-Type: application/json' -d {shlex.quote(json.dumps(labelled))}",
        ]
    message = {"role": "user", "content": example[:300]}
    program = (
        "from openai import OpenAI; "
        f"client = OpenAI(base_url={url + '/v1'!r}, api_key={key!r}); "
        f"answer = client.chat.completions.create(model={user!r}, messages=[{message!r}], max_tokens=24); "
        "print(answer.choices[0].message.content)"
    )
    lines += ["", "# the same with the openai client:", f".venv/bin/python -c {shlex.quote(program)}", ""]
    console.out.print("\n".join(lines), highlight=False, markup=False, soft_wrap=True)
