"""``tailorlm perf scale``: what the Ray backends buy on this machine, side by side with the local ones.

Training: users trained per hour by ``users train`` (the same users of an offline task, imported into a
fresh store per run), on the local backend and on a local Ray instance with 1, 2, ... workers, each
worker at this machine's threads divided among the workers (so no run oversubscribes the cores). The
clock runs from the call to the moment the last module is stored (the PAG profiles written afterwards by
the driver are the same work on every backend and are left out). The Ray instance's start is timed
apart: a long-lived cluster pays it once, not per job.

Serving: requests per second of the single-process server against Ray Serve with 1, 2, ... replicas
over the same store of users with random LoRA modules, under ``perf serve``'s closed-loop workload
(uniform users, prompts of 32-128 tokens, 16-64 new tokens generated to the end), every run bounded in
requests and seconds.

On one machine the Ray runs share the same cores as the local one: the speed-up column says what the
extra processes cost or gain here, not what more machines would give (docs/scaling.md).
"""

from __future__ import annotations

import asyncio
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tailorlm import models, settings
from tailorlm.cluster import serving
from tailorlm.cluster.session import connected
from tailorlm.cluster.training import RayRunner
from tailorlm.methods.deps import MethodSettings
from tailorlm.perf.harness import MachineWatch
from tailorlm.perf.serve import (
    UNIFORM,
    ServeLoadConfig,
    ServerProcess,
    build_store,
    drive,
    plan,
    server_config,
)
from tailorlm.serve.run import free_port
from tailorlm.train.jobs import LocalRunner, TrainRunner
from tailorlm.users.service import UserService


@dataclass(frozen=True)
class ScaleConfig:
    model: str | None = None  # the base model; "tiny" for a smoke run
    task: str = "verbagg"  # the offline task whose users train
    train_users: int = 16
    epochs: int = 1
    users_per_step: int = 8
    workers: tuple[int, ...] = (1, 2)  # Ray workers (training) and replicas (serving) per run
    serve: ServeLoadConfig = field(
        default_factory=lambda: ServeLoadConfig(
            users=(50,), main_users=50, slots=16, max_batch=16, clients=16
        )
    )


@dataclass
class ScaleRun:
    what: str  # "train" | "serve"
    backend: str  # "local" | "ray"
    workers: int  # Ray workers or replicas; 1 for the local backend
    seconds: float
    count: int  # users trained, or requests answered
    rate: float  # users per hour, or requests per second
    tokens_per_s: float | None = None
    speedup: float | None = None  # rate against the local backend's
    errors: int = 0
    load_average: list[float] | None = None  # the machine's 1-minute load before and after the run


# ---- training ------------------------------------------------------------------------------------------


def _time_training(root: Path, config: ScaleConfig, runner: TrainRunner) -> tuple[float, int]:
    """Seconds from the call until the last module was stored, and how many users were."""
    service = UserService(
        root,
        method_settings=replace(MethodSettings(), epochs=config.epochs, users_per_step=config.users_per_step),
        runner=runner,
    )
    service.import_task(config.task, users=config.train_users)
    service.configure(base_model=config.model or None)
    stored: list[float] = []
    started = time.perf_counter()
    outcome = service.train(on_user=lambda _record: stored.append(time.perf_counter()))
    service.close()
    return (max(stored) if stored else time.perf_counter()) - started, len(outcome.trained)


def _train_run(root: Path, config: ScaleConfig, runner: TrainRunner, backend: str, workers: int) -> ScaleRun:
    with MachineWatch(1) as machine:
        seconds, users = _time_training(root, config, runner)
    run = ScaleRun("train", backend, workers, seconds, users, users / seconds * 3600)
    run.load_average = machine.facts["load_average_1min"]
    return run


# ---- serving -------------------------------------------------------------------------------------------


def _serve_run(backend: str, workers: int, url: str, key: str, config: ServeLoadConfig) -> ScaleRun:
    users = config.main_users
    warm = plan(config, users, UNIFORM, None, config.seed + 1)[:4]
    asyncio.run(drive(url, key, warm, 4, 120))  # first-request costs (allocations) out of the timing
    with MachineWatch(1) as machine:
        outcomes, elapsed = asyncio.run(
            drive(url, key, plan(config, users, UNIFORM, None, config.seed), config.clients, config.seconds)
        )
    ok = [o for o in outcomes if o.status == 200]
    run = ScaleRun(
        "serve",
        backend,
        workers,
        elapsed,
        len(ok),
        len(ok) / elapsed if elapsed else 0.0,
        tokens_per_s=sum(o.tokens for o in ok) / elapsed if elapsed else 0.0,
        errors=len(outcomes) - len(ok),
    )
    run.load_average = machine.facts["load_average_1min"]
    return run


# ---- the run -------------------------------------------------------------------------------------------


def run_scale_benchmark(config: ScaleConfig, log: Callable[[str], None] = print) -> dict:
    """Every run of both questions, local first, then Ray on one local instance; a JSON-ready payload."""
    threads = settings.apply_threads()
    cores = settings.available_cores()
    serve_config = replace(config.serve, model=config.model)
    runs: list[ScaleRun] = []
    with tempfile.TemporaryDirectory(prefix="tailorlm-scale-") as scratch:
        folder = Path(scratch)
        # One user first, untimed: the first training of a process pays one-time costs (loading the
        # tokenizer and the model files, allocations) that a Ray worker pays outside its timing too.
        _time_training(folder / "warm-up", replace(config, train_users=1), LocalRunner())
        log(f"training {config.train_users} users of {config.task} on the local backend")
        runs.append(_train_run(folder / "local", config, LocalRunner(), "local", 1))
        log(f"building a store of {serve_config.main_users} users for the serving runs")
        key = build_store(folder / "serve", serve_config.main_users, config.model, serve_config.seed)
        log("serving from one process")
        with ServerProcess("tailorlm", folder / "serve", serve_config) as server:
            runs.append(_serve_run("local", 1, server.url, key, serve_config))
        started = time.perf_counter()
        with connected(cpus=cores):
            ray_start = time.perf_counter() - started
            for workers in config.workers:
                log(f"training on Ray with {workers} worker(s)")
                runner = RayRunner(
                    math.ceil(config.train_users / workers), workers=workers, threads=max(1, cores // workers)
                )
                runs.append(_train_run(folder / f"ray-{workers}", config, runner, "ray", workers))
            for replicas in config.workers:
                log(f"serving from Ray Serve with {replicas} replica(s)")
                ray_config = server_config(folder / "serve", free_port(), serve_config)
                with serving.serving(ray_config, replicas, threads=max(1, cores // replicas)) as url:
                    runs.append(_serve_run("ray", replicas, url, key, serve_config))
    for run in runs:
        local = next(r for r in runs if r.what == run.what and r.backend == "local")
        run.speedup = run.rate / local.rate if local.rate else None
    return {
        "benchmark": "scale",
        "model": config.model or models.DEFAULT_MODEL,
        "cores": cores,
        "threads": threads,
        "ray_start_seconds": ray_start,
        "config": asdict(config),
        "runs": [asdict(run) for run in runs],
    }
