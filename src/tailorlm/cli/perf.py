"""``tailorlm perf``: benchmarks measured on this machine, side by side with the alternatives."""

from __future__ import annotations

import typer

from tailorlm import models
from tailorlm.cli import app, console
from tailorlm.cli.common import DEVICE_OPTION, DTYPE_OPTION, JSON_OPTION, UserError, user_errors
from tailorlm.device import DeviceError, check_dtype_name

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
    device: str | None = DEVICE_OPTION,
    dtype: str | None = DTYPE_OPTION,
    resident: int = typer.Option(1000, min=1, help="Users resident in the bank during mixed batches."),
    users_per_batch: int = typer.Option(8, min=1, help="Distinct users in one mixed batch / training step."),
    repeats: int = typer.Option(5, min=1, help="Timed rounds per forward comparison (after a warm-up)."),
    tokens: int = typer.Option(128, min=8, help="Prompt length in tokens of the longest row of a batch."),
    decode_tokens: int = typer.Option(32, min=1, help="New tokens per row in the generation comparison."),
    train_repeats: int = typer.Option(3, min=1, help="Timed rounds of the training comparisons."),
    load_samples: int = typer.Option(200, min=1, help="Timed loads per store size."),
    only: list[str] | None = typer.Option(
        None,
        "--only",
        help="Sections to run, repeated or comma separated (default: all): one mixed batch per module "
        "kind (lora, ia3, prompt, bottleneck), decode, decode-single, gemm, train, train-task, memory, "
        "load, bytes.",
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Mixed-user batches (forward and generation) vs the bare base model and PEFT, one client decoding,
    the matmul peak, multi-user training vs stock PEFT (synthetic and real task rows, useful FLOP/s),
    where training memory goes, cold loads vs raw reads, and bytes per user at rest, each against its
    target. Without --dtype each section runs in fp32 and in bf16, side by side with what auto picks."""
    from tailorlm.cli import perf_tables
    from tailorlm.perf import runner
    from tailorlm.perf.harness import PerfConfig

    with user_errors(models.ModelNotFoundError, ValueError):
        sections = runner.parse_sections(only)
        if resident < users_per_batch:
            raise UserError(f"--resident ({resident}) must be at least --users-per-batch ({users_per_batch})")
        config = PerfConfig(
            model=model,
            device=device,
            dtype=dtype,
            resident=resident,
            users_per_batch=users_per_batch,
            repeats=repeats,
            tokens=tokens,
            decode_tokens=decode_tokens,
            train_repeats=train_repeats,
            load_samples=load_samples,
        )
        payload = runner.run_benchmark(
            config, sections, log=lambda message: console.err.print(message, highlight=False)
        )
    console.emit(payload, as_json, perf_tables.render)


@perf_app.command("serve")
def serve_command(
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Base model: the default SmolLM2-135M-Instruct, or 'tiny' for a smoke run.",
    ),
    users: list[int] | None = typer.Option(
        None, "--users", help="User counts of the scaling runs (repeatable; default 10, 200 and 1000)."
    ),
    main_users: int = typer.Option(200, "--main-users", min=1, help="Users in the contender comparison."),
    slots: int = typer.Option(32, "--slots", min=2, help="Resident modules (tailorlm) / adapters (PEFT)."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Rows decoded together, both servers."),
    clients: int = typer.Option(64, "--clients", min=1, help="Concurrent clients of the closed-loop runs."),
    requests: int = typer.Option(128, "--requests", min=1, help="Requests per run."),
    seconds: float = typer.Option(240.0, "--seconds", min=1.0, help="Time limit per run."),
    dtype: str | None = DTYPE_OPTION,
    compare_dtypes: str = typer.Option(
        "fp32,bf16",
        "--compare-dtypes",
        help="tailorlm is also run at --main-users in each of these dtypes (comma separated; '' for none).",
    ),
    single_client_requests: int = typer.Option(
        8, "--single-client-requests", min=0, help="Requests of the one-client runs (default dtype, fp32)."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """The server under load (S-LoRA's workload) vs a stock-PEFT server and the bare base model, on
    loopback: requests/s, tokens/s, time to first token, latency, batch sizes, slot loads, peak RSS; tailorlm
    in fp32 and bf16, and one client alone (tokens/s, median time between tokens)."""
    from tailorlm.cli import perf_tables
    from tailorlm.perf.serve import ServeLoadConfig, run_serve_benchmark

    with user_errors(models.ModelNotFoundError, ValueError, DeviceError):
        counts = tuple(sorted(set(users or (10, 200, 1000))))
        if min(counts) < 1:
            raise UserError("--users takes positive counts")
        config = ServeLoadConfig(
            model=model,
            users=tuple(sorted({*counts, main_users})),
            main_users=main_users,
            slots=slots,
            max_batch=max_batch,
            clients=clients,
            requests=requests,
            seconds=seconds,
            dtype=check_dtype_name(dtype) if dtype else None,
            compare_dtypes=tuple(check_dtype_name(d) for d in compare_dtypes.split(",") if d.strip()),
            single_client_requests=single_client_requests,
        )
        payload = run_serve_benchmark(config, log=lambda message: console.err.print(message, highlight=False))
    console.emit(payload, as_json, perf_tables.render_serve)


@perf_app.command("scale")
def scale_command(
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Base model: the default SmolLM2-135M-Instruct, or 'tiny' for a smoke run.",
    ),
    train_users: int = typer.Option(16, "--train-users", min=1, help="Users trained per training run."),
    epochs: int = typer.Option(1, "--epochs", min=1, help="Epochs per user."),
    workers: list[int] | None = typer.Option(
        None, "--workers", help="Ray workers / replicas per run (repeatable; default 1 and 2)."
    ),
    serve_users: int = typer.Option(
        50, "--serve-users", min=1, help="Users with a module in the serving runs."
    ),
    requests: int = typer.Option(64, "--requests", min=1, help="Requests per serving run."),
    clients: int = typer.Option(16, "--clients", min=1, help="Concurrent clients of the serving runs."),
    seconds: float = typer.Option(180.0, "--seconds", min=1.0, help="Time limit per serving run."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Users trained per hour and requests per second: the local backends beside a local Ray instance
    with 1, 2, ... workers (training) and replicas (serving), with the speed-up against local."""
    from tailorlm.cli import perf_tables
    from tailorlm.cluster.session import ClusterError
    from tailorlm.perf.scale import ScaleConfig, run_scale_benchmark
    from tailorlm.perf.serve import ServeLoadConfig

    with user_errors(models.ModelNotFoundError, ValueError, ClusterError):
        counts = tuple(sorted(set(workers or (1, 2))))
        if min(counts) < 1:
            raise UserError("--workers takes positive counts")
        serve = ServeLoadConfig(
            model=model,
            users=(serve_users,),
            main_users=serve_users,
            slots=16,
            max_batch=16,
            clients=clients,
            requests=requests,
            seconds=seconds,
        )
        config = ScaleConfig(model=model, train_users=train_users, epochs=epochs, workers=counts, serve=serve)
        payload = run_scale_benchmark(config, log=lambda message: console.err.print(message, highlight=False))
    console.emit(payload, as_json, perf_tables.render_scale)
