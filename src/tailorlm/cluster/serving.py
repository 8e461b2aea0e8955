"""``tailorlm serve --backend ray``: N engine replicas behind Ray Serve, one HTTP front.

Layout (one Serve application, every deployment bound to this machine's loopback by default):

    client --HTTP--> Serve proxy --> front (our FastAPI app: keys, limits, prompts, the same errors)
                                        | rendezvous hash of the user id
                                        v
                       tailorlm-replica-0 ... tailorlm-replica-{N-1}
                       (each a whole engine + continuous-batching scheduler over the same store)

Each replica is its own single-replica deployment, and the front picks one by rendezvous hashing of the
user id (``home_replica``): a user's requests always reach the same replica, so their module stays
resident in its slots, and adding a replica moves only the users it wins. Inside a replica requests of
many users still share every batch: the replica runs tailorlm's own scheduler. Ray Serve's model
multiplexing is not used on purpose: its ``@serve.batch`` splits a batch by model id, which with one id
per user would put every user in a batch of their own.

The front forwards a prepared job (the user's module version, bank, prompt tokens, sampling) and relays
the replica's events; a client that goes away cancels the remote request, which cancels the job in the
replica's scheduler. Forgetting a user clears their slots on every replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from tailorlm import settings
from tailorlm.cluster.session import connected, import_ray
from tailorlm.serve.config import ServeConfig
from tailorlm.serve.scheduler import Event, Job, JobError
from tailorlm.serve.server import LocalServer, Server

APP_NAME = "tailorlm"
FRONT = "tailorlm-front"
# An event's fields but its error, which crosses as its own fields (``event_message``).
EVENT_FIELDS = tuple(f.name for f in dataclasses.fields(Event) if f.name != "error")


def replica_names(count: int) -> list[str]:
    return [f"tailorlm-replica-{index}" for index in range(count)]


def home_replica(user_id: str, replicas: Sequence[str]) -> str:
    """The replica that serves ``user_id``: the highest sha256 of (replica, user) (rendezvous hashing),
    stable for a user as long as the replicas are the same, and when one is added or removed only the
    users it wins or held move."""
    return max(replicas, key=lambda name: hashlib.sha256(f"{name}\n{user_id}".encode()).digest())


# ---- what crosses between front and replica ---------------------------------------------------------
# Ray Serve pickles what crosses (its default serialization, which ``deploy`` keeps): a job's request fields
# (those ``Job`` marks) cross as they are, an event's too, and its ``JobError`` as its fields (an
# exception's pickle keeps only its message).


def job_message(job: Job) -> dict[str, Any]:
    return {name: getattr(job, name) for name in Job.request_fields()}


def job_from(message: dict[str, Any], emit: Callable[[Event], None]) -> Job:
    """The job ``job_message`` sent, on the replica, with its events going to ``emit``."""
    return Job(**message, emit=emit)


def event_message(event: Event) -> dict[str, Any]:
    message = {name: getattr(event, name) for name in EVENT_FIELDS}
    error = event.error
    if error is not None:
        message["error"] = {
            "reason": error.reason,
            "message": error.message,
            "retry_after": error.retry_after,
        }
    return message


def event_from(message: dict[str, Any]) -> Event:
    error = message.get("error")
    fields = {name: message[name] for name in EVENT_FIELDS}
    return Event(**fields, error=JobError(**error) if error else None)


# ---- the replica -------------------------------------------------------------------------------------


class Replica:
    """One engine replica: a whole local server (base model, a bank per module layout, slots loading
    modules from the store, the scheduler thread, the forget sweep) without an HTTP front of its own."""

    def __init__(self, config: ServeConfig, name: str, threads: int) -> None:
        settings.apply_threads(threads)
        self.name = name
        self.server = LocalServer(config)
        self.server.start()
        self.served: Counter[str] = Counter()  # requests per user, to show affinity

    async def run(self, message: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """One job's events, streamed back to the front until the final one."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        job = job_from(message, emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            self.server.scheduler.submit(job)
        except JobError as error:  # the queue is full: the client hears the same 429 as from one server
            yield event_message(Event(error=error))
            return
        self.served[job.user_id] += 1
        finished = False
        try:
            while not finished:
                event = await events.get()
                finished = event.final
                yield event_message(event)
        finally:
            if not finished:  # the front (its client) went away
                self.server.scheduler.cancel(job)

    def forget(self, user_id: str) -> int:
        self.served.pop(user_id, None)  # a forgotten user's request count goes with them
        return self.server.forget_in_memory(user_id)

    def stats(self) -> dict[str, Any]:
        """Whom this replica served, and how many rows its decode steps held on average (above 1: users'
        requests shared batches)."""
        registry = self.server.metrics.registry
        steps = registry.get_sample_value("tailorlm_batch_size_count") or 0.0
        rows = registry.get_sample_value("tailorlm_batch_size_sum") or 0.0
        return {
            "name": self.name,
            "served": dict(self.served),
            "pending": self.server.scheduler.pending(),
            "mean_batch": rows / steps if steps else None,
        }

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.server.stop()


# ---- the front ---------------------------------------------------------------------------------------


class RemoteScheduler:
    """The front's ``JobScheduler``: each job goes to its user's home replica and its events come back."""

    def __init__(self, replicas: dict[str, Any]) -> None:
        self.replicas = replicas  # name -> Serve deployment handle
        self._tasks: dict[int, asyncio.Task] = {}  # id(job) -> the task relaying it

    def submit(self, job: Job) -> None:
        """Called on the front's event loop (a route): relaying starts as a task of that loop."""
        job.placed_on = home_replica(job.user_id, list(self.replicas))
        task = asyncio.get_running_loop().create_task(self._relay(job))
        self._tasks[id(job)] = task
        task.add_done_callback(lambda _: self._tasks.pop(id(job), None))

    async def _relay(self, job: Job) -> None:
        handle = self.replicas[job.placed_on]
        try:
            async for message in handle.options(stream=True).run.remote(job_message(job)):
                job.emit(event_from(message))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the replica died or is restarting: a retryable 503
            job.emit(
                Event(
                    error=JobError(
                        "replica_unavailable",
                        f"replica {job.placed_on} is unavailable ({type(error).__name__}); retry shortly",
                        retry_after=1.0,
                    )
                )
            )

    def cancel(self, job: Job) -> None:
        task = self._tasks.get(id(job))
        if task is not None:
            task.cancel()  # cancels the remote request, which cancels the replica's job

    def pending(self) -> int:
        return len(self._tasks)

    def forget(self, user_id: str) -> int:
        """Clear the user's slots on every replica (a route's worker thread may block here)."""
        return sum(handle.forget.remote(user_id).result() for handle in self.replicas.values())

    def stalled_for(self) -> float:
        """0: the front has no engine loop of its own to watch (each replica's watchdog counts its own)."""
        return 0.0

    def start(self) -> None:
        return None

    def stop(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()


class Front:
    """The HTTP front: tailorlm's FastAPI app over a server without an engine, its scheduler routing each
    job to a replica (``replicas``: their Serve deployment handles)."""

    def __init__(self, config: ServeConfig, *replicas: Any) -> None:
        routes = dict(zip(replica_names(len(replicas)), replicas, strict=True))
        self.server = Server(config, lambda _server: RemoteScheduler(routes), engines=len(replicas))

    def __serve_build_asgi_app__(self) -> Any:
        from tailorlm.serve.app import create_app  # FastAPI loads only where the front runs

        return create_app(self.server)


# ---- deploying ---------------------------------------------------------------------------------------


def deploy(config: ServeConfig, replicas: int, threads: int | None = None) -> str:
    """The application on the Ray instance this process has joined: ``replicas`` engine replicas
    (``threads`` torch threads and as many logical CPUs each; default: this machine's threads split
    among them) behind the front, Serve's HTTP proxy on ``config``'s host and port. Returns its URL."""
    import_ray()
    from ray import serve

    if replicas < 1:
        raise ValueError(f"serve with at least one replica, not {replicas}")
    threads = threads or max(1, settings.thread_count() // replicas)
    _start_proxy(config)
    replica = serve.deployment(Replica)
    bound = [
        replica.options(name=name, num_replicas=1, ray_actor_options={"num_cpus": threads}).bind(
            config, name, threads
        )
        for name in replica_names(replicas)
    ]
    front = serve.deployment(serve.ingress()(Front), name=FRONT, ray_actor_options={"num_cpus": 0})
    serve.run(front.bind(config, *bound), name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{config.host}:{config.port}"


def _start_proxy(config: ServeConfig, attempts: int = 3) -> None:
    """Serve's HTTP proxy on ``config``'s host and port. Serve waits a fixed 60 s for the proxy actor to
    start, and on a machine whose cores are saturated the actor can take longer than that, so the start is
    tried again on a clean Serve before giving up."""
    import ray
    from ray import serve

    for attempt in range(attempts):
        try:
            serve.start(http_options={"host": config.host, "port": config.port})
            return
        except (ray.exceptions.ActorDiedError, ray.exceptions.GetTimeoutError):
            if attempt == attempts - 1:
                raise
            serve.shutdown()


def replica_stats(replicas: int) -> list[dict[str, Any]]:
    """Each replica's own account of whom it served (tests and ``perf scale`` read it)."""
    from ray import serve

    return [
        serve.get_deployment_handle(name, APP_NAME).stats.remote().result()
        for name in replica_names(replicas)
    ]


def shutdown() -> None:
    from ray import serve

    serve.shutdown()


@contextlib.contextmanager
def serving(config: ServeConfig, replicas: int, threads: int | None = None) -> Iterator[str]:
    """The application deployed for the block (on the instance this process has joined); yields its URL."""
    try:
        yield deploy(config, replicas, threads)
    finally:
        shutdown()


def serve_forever(config: ServeConfig, replicas: int, address: str | None = None) -> None:
    """``tailorlm serve --backend ray``: deploy on a new local instance (or the cluster at ``address``)
    and serve until interrupted."""
    with connected(address), serving(config, replicas), contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(1.0)
