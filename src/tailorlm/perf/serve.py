"""``tailorlm perf serve``: the server under load, side by side with a stock-PEFT server and the bare base
model, in the manner of S-LoRA.

Users hold stored LoRA r8 q,v modules (random, nonzero: speed does not depend on what they learned).
A run picks each request's user uniformly or by S-LoRA's power law (``int(power(alpha) * n)``), its prompt
of 32-128 tokens and 16-64 new tokens (generated to the end: ``ignore_eos``), and sends it at Poisson
arrival times or from a closed loop of concurrent clients. Every run is bounded in requests and in
seconds and stops by itself; every server is a fresh process on 127.0.0.1, so its peak RSS is its own.

Contenders: ``tailorlm`` (the server as shipped), ``peft`` (``perf.serve_peft``: one ``PeftModel``, an LRU
of adapters as large as the server's slots, one adapter per batch), ``bare`` (the bare base model under
tailorlm's scheduler: the upper bound).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import httpx
import numpy as np
import torch

from tailorlm import kinds, models, settings
from tailorlm.engine.engine import Engine
from tailorlm.perf.harness import status_kib
from tailorlm.serve.config import ServeConfig
from tailorlm.serve.run import free_port, wait_healthy
from tailorlm.serve.scheduler import Job, Scheduler, SchedulerConfig
from tailorlm.serve.server import LocalServer, Server
from tailorlm.users.service import UserService

TAILORLM, PEFT, BARE = "tailorlm", "peft", "bare"
UNIFORM = 1.0  # numpy's power(1) is uniform
SKEWED = 0.3
WORDS = [
    "the",
    "user",
    "wrote",
    "about",
    "a",
    "day",
    "in",
    "the",
    "city",
    "with",
    "friends",
    "and",
    "asked",
    "what",
    "the",
    "weather",
    "would",
    "be",
    "like",
    "tomorrow",
    "because",
    "a",
    "long",
    "walk",
    "by",
    "the",
    "river",
    "was",
    "planned",
    "after",
    "work",
    "near",
    "the",
    "old",
    "market",
    "square",
]


@dataclass(frozen=True)
class ServeLoadConfig:
    model: str | None = None  # the base model; "tiny" for a smoke run
    users: tuple[int, ...] = (10, 200, 1000)
    main_users: int = 200  # the user count of the contender comparison
    # As many slots as rows in a batch: with fewer, a batch of requests from distinct users is capped at
    # the slot count (a module must be resident to run). The PEFT contender gets an LRU of the same size.
    slots: int = 32
    max_batch: int = 32
    wait_ms: float = 10.0
    clients: int = 64
    requests: int = 128  # per run
    seconds: float = 240.0  # per run: a run that has not finished by then stops and counts what finished
    prompt_tokens: tuple[int, int] = (32, 128)
    new_tokens: tuple[int, int] = (16, 64)
    rates: tuple[float, ...] = (0.5, 0.9)  # Poisson runs, as fractions of tailorlm's closed-loop throughput
    seed: int = 0
    # Precision: the dtype of every server (None: the default, --dtype auto), the dtypes tailorlm is also
    # run in at main_users for a side-by-side, and the requests of the single-client runs (in the default
    # dtype and in fp32; 0: none), which show one stream's tokens/s and time between tokens.
    dtype: str | None = None
    compare_dtypes: tuple[str, ...] = ("fp32", "bf16")
    single_client_requests: int = 8


@dataclass(frozen=True)
class RequestPlan:
    user: str
    prompt: str
    max_tokens: int
    at: float | None = None  # seconds after the run starts (Poisson); None: closed loop


@dataclass
class Outcome:
    status: int
    ttft: float | None = None
    latency: float | None = None
    tokens: int = 0
    error: str | None = None
    gaps: list[float] = field(default_factory=list)  # seconds between consecutive streamed text events


@dataclass
class RunResult:
    name: str
    contender: str
    users: int
    popularity: str
    arrival: str
    sent: int
    ok: int
    errors: int
    seconds: float
    requests_per_s: float
    tokens_per_s: float
    ttft_p50: float | None
    ttft_p90: float | None
    latency_p50: float | None
    latency_p95: float | None
    mean_batch: float | None
    slot_loads: int | None
    peak_rss_mb: float | None
    notes: list[str] = field(default_factory=list)
    dtype: str = "default"  # what the server was told (--dtype), "default" when nothing
    clients: int | None = None
    between_tokens_p50: float | None = None  # median seconds between a stream's consecutive tokens


# ---- the store ----------------------------------------------------------------------------------------


def user_name(index: int) -> str:
    return f"user-{index:05d}"


def build_store(root: Path, users: int, model: str | None, seed: int) -> str:
    """``users`` users with random nonzero LoRA r8 q,v modules; returns an admin key."""
    base = models.load_base(model)
    spec = kinds.default_spec("lora")
    engine = Engine(base, spec, slots=2)
    service = UserService(root, load_base=lambda: base)
    service.configure(base_model=model or None)
    generator = torch.Generator().manual_seed(seed)
    for index in range(users):
        engine.bank.reset(1, generator)
        module = {
            n: t + 0.01 * torch.randn(t.shape, generator=generator) for n, t in engine.bank.read(1).items()
        }
        service.add(user_name(index), "lora")
        service.store.put(user_name(index), spec, module, model=engine.model, base_name=base.name)
    key = service.issue_key(None, admin=True)
    service.close()
    return key


# ---- the workload -------------------------------------------------------------------------------------


def plan(
    config: ServeLoadConfig, users: int, alpha: float, rate: float | None, seed: int
) -> list[RequestPlan]:
    """The run's requests: users by popularity, prompt and answer lengths uniform in their ranges, arrival
    times from a Poisson process at ``rate`` per second (None: a closed loop)."""
    rng = np.random.default_rng(seed)
    words = random.Random(seed)
    at = 0.0
    plans = []
    for _ in range(config.requests):
        user = min(users - 1, int(rng.power(alpha) * users))
        length = int(rng.integers(config.prompt_tokens[0], config.prompt_tokens[1] + 1))
        prompt = " ".join(words.choice(WORDS) for _ in range(length))
        if rate is not None:
            at += float(rng.exponential(1.0 / rate))
        plans.append(
            RequestPlan(
                user_name(user),
                prompt,
                int(rng.integers(config.new_tokens[0], config.new_tokens[1] + 1)),
                at if rate is not None else None,
            )
        )
    return plans


async def _one(http: httpx.AsyncClient, item: RequestPlan) -> Outcome:
    body = {
        "model": item.user,
        "prompt": item.prompt,
        "max_tokens": item.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = None
    tokens = 0
    gaps: list[float] = []
    last = None
    try:
        async with http.stream("POST", "/v1/completions", json=body) as answer:
            if answer.status_code != 200:
                return Outcome(answer.status_code, error=(await answer.aread()).decode()[:200])
            async for line in answer.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return Outcome(500, error=str(event["error"])[:200])
                if event.get("choices") and event["choices"][0].get("text"):
                    now = time.perf_counter()
                    if first is None:
                        first = now - started
                    if last is not None:
                        gaps.append(now - last)
                    last = now
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    except httpx.HTTPError as error:
        return Outcome(0, error=f"{type(error).__name__}: {error}")
    latency = time.perf_counter() - started
    return Outcome(200, first if first is not None else latency, latency, tokens, gaps=gaps)


async def drive(
    url: str, key: str, plans: Sequence[RequestPlan], clients: int, seconds: float
) -> tuple[list[Outcome], float]:
    """Send the planned requests (closed loop of ``clients``, or at their arrival times); stop at
    ``seconds``. Returns the outcomes of the requests that were sent and the run's wall time."""
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    headers = {"Authorization": f"Bearer {key}"}
    outcomes: list[Outcome] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=seconds + 60, limits=limits) as http:
        started = time.perf_counter()
        if plans and plans[0].at is None:
            queue = list(reversed(plans))

            async def client() -> None:
                while queue and time.perf_counter() - started < seconds:
                    outcomes.append(await _one(http, queue.pop()))

            tasks = [asyncio.create_task(client()) for _ in range(clients)]
        else:

            async def timed(item: RequestPlan) -> None:
                await asyncio.sleep(max(0.0, item.at - (time.perf_counter() - started)))
                outcomes.append(await _one(http, item))

            tasks = [asyncio.create_task(timed(item)) for item in plans if item.at < seconds]
        _done, pending = await asyncio.wait(tasks, timeout=seconds + 30)
        for task in pending:
            task.cancel()
        elapsed = time.perf_counter() - started
    return outcomes, elapsed


# ---- the servers ----------------------------------------------------------------------------------------


def server_config(root: Path, port: int, config: ServeLoadConfig) -> ServeConfig:
    """The settings every server under load runs with (here and in ``perf scale``)."""
    return ServeConfig(
        store=root,
        port=port,
        base_model=config.model,
        slots=config.slots,
        scheduler=SchedulerConfig(
            max_batch=config.max_batch, wait_ms=config.wait_ms, max_queue=4 * config.clients
        ),
        max_context=512,
        retrain=False,
    )


class BareScheduler(Scheduler):
    """tailorlm's scheduler with every job on the bare base model (bank -1: no module), the upper bound."""

    def submit(self, job: Job) -> None:
        job.bank = -1
        super().submit(job)


def contender_server(contender: str, serve_config: ServeConfig, config: ServeLoadConfig) -> Server:
    """A contender's server, built (not started): its scheduler behind the same HTTP front."""
    if contender == PEFT:
        from tailorlm.perf.serve_peft import PeftScheduler

        base = models.load_base(config.model)

        def peft(server: Server) -> PeftScheduler:
            return PeftScheduler(base, server.store, config.slots, serve_config.scheduler, server.metrics)

        return Server(serve_config, peft)
    if contender == BARE:
        return LocalServer(
            serve_config,
            scheduler=lambda server: BareScheduler(
                server.engine, server.managers, serve_config.scheduler, server.metrics
            ),
        )
    return LocalServer(serve_config)


def _serve(contender: str, root: str, port: int, config: ServeLoadConfig) -> None:
    """A contender's server process (spawned): serves until terminated."""
    from tailorlm.serve.run import run_forever

    if config.dtype:  # the server and the PEFT contender load their base in the default dtype
        os.environ[settings.DTYPE_ENV] = config.dtype
    settings.apply_threads()
    run_forever(contender_server(contender, server_config(Path(root), port, config), config))


class ServerProcess:
    def __init__(self, contender: str, root: Path, config: ServeLoadConfig) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        context = multiprocessing.get_context("spawn")
        self.process = context.Process(
            target=_serve, args=(contender, str(root), self.port, config), daemon=True
        )

    def __enter__(self) -> ServerProcess:
        self.process.start()
        try:
            wait_healthy(self.url, self.process.is_alive, timeout=300)
        except RuntimeError:
            self.process.kill()
            raise
        return self

    def peak_rss_mb(self) -> float | None:
        kib = status_kib("VmHWM", self.process.pid)
        return None if kib is None else kib / 1024

    def metrics(self, key: str) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=30).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


# ---- one run, all runs ---------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def run_one(
    name: str,
    contender: str,
    root: Path,
    key: str,
    config: ServeLoadConfig,
    users: int,
    alpha: float,
    rate: float | None,
) -> RunResult:
    plans = plan(config, users, alpha, rate, config.seed)
    with ServerProcess(contender, root, config) as server:
        warm = plan(config, users, alpha, None, config.seed + 1)[:2]
        asyncio.run(
            drive(server.url, key, warm, 2, 120)
        )  # first-request costs (allocations) out of the timing
        before = server.metrics(key)
        outcomes, elapsed = asyncio.run(drive(server.url, key, plans, config.clients, config.seconds))
        after = server.metrics(key)
        peak = server.peak_rss_mb()
    ok = [o for o in outcomes if o.status == 200]

    def delta(metric: str) -> float:
        return after.get(metric, 0.0) - before.get(metric, 0.0)

    steps = delta("tailorlm_batch_size_count")
    notes = [o.error for o in outcomes if o.error][:3]
    if len(outcomes) < len(plans):
        notes.append(
            f"{len(plans) - len(outcomes)} planned requests not finished within the {config.seconds:g} s "
            "limit and 30 s more for those in flight"
        )
    return RunResult(
        name=name,
        contender=contender,
        users=users,
        popularity="uniform" if alpha == UNIFORM else f"power-law alpha {alpha:g}",
        arrival="closed loop" if rate is None else f"Poisson {rate:.2f}/s",
        sent=len(outcomes),
        ok=len(ok),
        errors=len(outcomes) - len(ok),
        seconds=elapsed,
        requests_per_s=len(ok) / elapsed if elapsed else 0.0,
        tokens_per_s=sum(o.tokens for o in ok) / elapsed if elapsed else 0.0,
        ttft_p50=_percentile([o.ttft for o in ok], 50),
        ttft_p90=_percentile([o.ttft for o in ok], 90),
        latency_p50=_percentile([o.latency for o in ok], 50),
        latency_p95=_percentile([o.latency for o in ok], 95),
        mean_batch=delta("tailorlm_batch_size_sum") / steps if steps else None,
        slot_loads=int(delta("tailorlm_slot_misses_total")),
        peak_rss_mb=peak,
        notes=notes,
        dtype=config.dtype or "default",
        clients=config.clients,
        between_tokens_p50=_percentile([gap for o in ok for gap in o.gaps], 50),
    )


@dataclass(frozen=True)
class Target:
    what: str
    measured: float | None
    target: str
    passed: bool


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def targets(runs: dict[str, RunResult], config: ServeLoadConfig) -> list[Target]:
    main, peft, bare = runs.get("tailorlm"), runs.get("peft"), runs.get("bare")
    few = runs.get(f"tailorlm-{min(config.users)}")
    many = runs.get(f"tailorlm-{max(config.users)}")
    found = []

    def add(what: str, value: float | None, target: str, ok: Callable[[float], bool]) -> None:
        found.append(Target(what, value, target, value is not None and ok(value)))

    if main and peft:
        add(
            f"tailorlm / stock PEFT, requests/s at {config.main_users} users uniform",
            _ratio(main.requests_per_s, peft.requests_per_s),
            ">= 4x",
            lambda v: v >= 4.0,
        )
    if main and bare:
        add(
            "tailorlm / bare base model, requests/s",
            _ratio(main.requests_per_s, bare.requests_per_s),
            ">= 0.8x",
            lambda v: v >= 0.8,
        )
    if few and many:
        add(
            f"tailorlm at {max(config.users)} users / at {min(config.users)} users, requests/s",
            _ratio(many.requests_per_s, few.requests_per_s),
            ">= 0.9x",
            lambda v: v >= 0.9,
        )
        add(
            f"peak RSS at {max(config.users)} users / at {min(config.users)} users",
            _ratio(many.peak_rss_mb, few.peak_rss_mb),
            "<= 1.2x",
            lambda v: v <= 1.2,
        )
    full, half = runs.get(_dtype_run("fp32")), runs.get(_dtype_run("bf16"))
    if full and half:
        add(
            f"tailorlm bf16 / fp32, requests/s at {config.main_users} users",
            _ratio(half.requests_per_s, full.requests_per_s),
            ">= 1.5x",
            lambda v: v >= 1.5,
        )
    one, one_fp32 = runs.get(SINGLE), runs.get(f"{SINGLE}-fp32")
    if one and one_fp32:
        add(
            f"one client, tokens/s, {one.dtype} / fp32",
            _ratio(one.tokens_per_s, one_fp32.tokens_per_s),
            ">= 1.5x",
            lambda v: v >= 1.5,
        )
    add("errors in all runs", float(sum(r.errors for r in runs.values())), "0", lambda v: v == 0)
    return found


SINGLE = "tailorlm-1-client"


def _dtype_run(dtype: str) -> str:
    return f"tailorlm-{dtype}"


def precision_runs(config: ServeLoadConfig) -> list[tuple[str, ServeLoadConfig]]:
    """The runs added for precision: tailorlm at main_users in each of ``compare_dtypes`` (closed loop,
    the main run's clients), then one client alone in the default dtype and in fp32."""
    runs = [(_dtype_run(dtype), replace(config, dtype=dtype)) for dtype in config.compare_dtypes]
    if config.single_client_requests:
        alone = replace(config, clients=1, requests=config.single_client_requests)
        runs += [(SINGLE, alone), (f"{SINGLE}-fp32", replace(alone, dtype="fp32"))]
    return runs


def precision_facts(config: ServeLoadConfig) -> dict:
    """The device the servers run on and what their default dtype resolves to, and why."""
    base = models.load_base(config.model, dtype=config.dtype)
    return {
        "device": str(base.device),
        "dtype": str(base.dtype).removeprefix("torch."),
        "dtype_reason": base.precision.reason if base.precision else "asked for",
    }


def run_serve_benchmark(config: ServeLoadConfig, log: Callable[[str], None] = print) -> dict:
    """Every run, the ratios against the targets, and the machine's facts, as one JSON-ready payload."""
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="tailorlm-perf-serve-"))
    try:
        log(f"building a store of {max(config.users)} users with LoRA r8 q,v modules in {root}")
        key = build_store(root, max(config.users), config.model, config.seed)
        runs: dict[str, RunResult] = {}
        schedule = [
            ("tailorlm", TAILORLM, config.main_users, UNIFORM, None),
            ("peft", PEFT, config.main_users, UNIFORM, None),
            ("bare", BARE, config.main_users, UNIFORM, None),
            ("tailorlm-skewed", TAILORLM, config.main_users, SKEWED, None),
            *[(f"tailorlm-{n}", TAILORLM, n, UNIFORM, None) for n in config.users if n != config.main_users],
        ]
        for name, contender, users, alpha, rate in schedule:
            popularity = "uniform" if alpha == UNIFORM else "skewed"
            log(f"run {name}: {contender}, {users} users, {popularity}, closed loop")
            runs[name] = run_one(name, contender, root, key, config, users, alpha, rate)
            log(f"  {runs[name].requests_per_s:.2f} requests/s, {runs[name].errors} errors")
        if config.main_users in config.users:
            runs[f"tailorlm-{config.main_users}"] = runs["tailorlm"]
        for fraction in config.rates:
            rate = fraction * runs["tailorlm"].requests_per_s
            name = f"tailorlm-poisson-{fraction:g}"
            log(f"run {name}: Poisson arrivals at {rate:.2f}/s")
            runs[name] = run_one(name, TAILORLM, root, key, config, config.main_users, UNIFORM, rate)
        for name, each in precision_runs(config):
            log(f"run {name}: tailorlm, {each.clients} client(s), dtype {each.dtype or 'default'}")
            runs[name] = run_one(name, TAILORLM, root, key, each, config.main_users, UNIFORM, None)
            log(f"  {runs[name].requests_per_s:.2f} requests/s, {runs[name].tokens_per_s:.1f} tokens/s")
        found = targets(runs, config)
        machine = precision_facts(config)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "benchmark": "serve",
        "config": asdict(config),
        "threads": settings.available_cores(),
        "torch": torch.__version__,
        **machine,
        "runs": [asdict(r) for name, r in runs.items() if name != f"tailorlm-{config.main_users}"],
        "targets": [asdict(t) for t in found],
        "passed": sum(t.passed for t in found),
        "missed": sum(not t.passed for t in found),
        "total_seconds": time.perf_counter() - started,
    }
