"""Training users' groups on Ray workers: the ``TrainRunner`` behind ``--backend ray``.

The driver cuts the job into the same groups the local runner trains (``train.jobs.plan_groups``), puts
one copy of the base model in Ray's object store (``ray.put``, once: every task gets the reference, not
the weights by value) and runs one Ray task per group, at most ``workers`` at once. A task builds its
engine on that base, trains its group many users per step with the same trainer, and writes each module
to the store (a path every worker sees) the moment its user finishes. The driver aggregates progress
from a small actor each task reports its steps to, and hears of stored users when a group returns.

Failures: a task whose worker process dies (killed, out of memory, its node lost) is retried by Ray up to
``max_retries`` times; the retry skips users its first attempt already stored (``jobs.done_since``).
An exception raised by the training itself is not retried (it would fail the same way) and reaches the
caller as itself. A driver killed mid-job cancels nothing it cannot reach, but started again it trains
only users not yet stored with their current data (``UserService.train``'s fingerprints).

Same seed, same modules: a task sets torch's thread count to the driver's (``threads``) before it
trains, and builds its engine with the driver engine's shape, so a group trains exactly as it does in
the local runner; the tests compare the modules bit for bit.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from tailorlm import settings
from tailorlm.cluster.session import ClusterError, check_backend, connected, import_ray
from tailorlm.engine.engine import Engine
from tailorlm.models import BaseModel
from tailorlm.progress import ProgressCallback
from tailorlm.store.store import ModuleStore
from tailorlm.train.jobs import (
    DEFAULT_GROUP_USERS,
    EngineShape,
    LocalRunner,
    StoredCallback,
    TrainRunner,
    TrainWork,
    plan_groups,
    train_group,
)
from tailorlm.train.trainer import UserData

# Fault injection for the tests: when this names a file, the first worker to report a training step
# removes the file and exits at once (as a killed worker would), so exactly one attempt dies mid-group.
KILL_FILE_ENV = "TAILORLM_TEST_KILL_FILE"
POLL_SECONDS = 0.5  # how often the driver refreshes progress while groups run


class _Board:
    """The steps each running group has taken (a retried group starts again from zero)."""

    def __init__(self) -> None:
        self.steps: dict[int, int] = {}

    def report(self, group: int, done: int) -> None:
        self.steps[group] = done

    def snapshot(self) -> dict[int, int]:
        return dict(self.steps)


def _die_if_armed() -> None:
    path = os.environ.get(KILL_FILE_ENV)
    if path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # only one process can remove it: that one dies
            os._exit(1)


def train_on_worker(
    base: BaseModel,
    shape: EngineShape,
    work: TrainWork,
    root: str,
    group: int,
    board: Any,
    threads: int,
    incarnations: dict[str, float] | None = None,
) -> list[str]:
    """One group, inside a Ray task: ``base`` is the object store's copy (this task's own once
    deserialized, so the engine may wrap it). ``incarnations``: the caller's ``ModuleStore.incarnations``,
    so a user forgotten (and maybe created again) while the task trains gets no version from it."""
    settings.apply_threads(threads)
    engine = shape.build(base)
    store = ModuleStore(root)
    store.incarnations.update(incarnations or {})

    def report(done: int, _total: int) -> None:
        board.report.remote(group, done)
        _die_if_armed()

    try:
        return train_group(engine, store, work, work.users, report)
    finally:
        store.close()


@dataclass
class RayRunner:
    """Groups of users trained by Ray tasks on the instance this process has joined
    (``cluster.session.connected``). ``workers``: groups in flight at once (default: the instance's CPUs
    divided by ``threads``); ``threads``: torch threads per task (default: this process's count, split
    among ``workers`` when given, so they do not oversubscribe the cores; the modules then equal the
    local backend's up to float rounding, and bit for bit at equal thread counts)."""

    group_users: int = DEFAULT_GROUP_USERS
    workers: int | None = None
    threads: int | None = None
    max_retries: int = 3

    def train(
        self,
        engine: Engine,
        work: TrainWork,
        store: ModuleStore,
        fresh_base: Callable[[], BaseModel] | None = None,
        on_progress: ProgressCallback | None = None,
        on_stored: StoredCallback | None = None,
    ) -> list[str]:
        ray = import_ray()
        if not ray.is_initialized():
            raise ClusterError("the Ray runner needs a Ray instance: join one first (cluster.session)")
        if fresh_base is None:
            raise ClusterError("the Ray runner ships a fresh copy of the base model: give fresh_base")
        groups = plan_groups(work.users, self.group_users)
        if not groups:
            return []
        threads = self.threads or max(1, settings.thread_count() // (self.workers or 1))
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if threads > cpus:  # a task asks for one CPU per thread: it would wait forever
            raise ClusterError(
                f"a worker of {threads} threads needs {threads} CPUs; the Ray instance has {cpus}"
            )
        window = self.workers or max(1, cpus // threads)
        task = ray.remote(train_on_worker).options(
            num_cpus=threads, max_retries=self.max_retries, retry_exceptions=False
        )
        board = ray.remote(num_cpus=0)(_Board).remote()
        base = ray.put(fresh_base())  # once: every task gets this reference
        shape = EngineShape.of(engine)
        waiting = list(enumerate(groups))
        running: dict[Any, int] = {}
        finished: set[int] = set()
        trained: list[str] = []
        reported = -1
        try:
            while waiting or running:
                while waiting and len(running) < window:
                    index, group = waiting.pop(0)
                    part = _part(work, group)
                    incarnations = {
                        u.user_id: store.incarnations[u.user_id]
                        for u in group
                        if u.user_id in store.incarnations
                    }
                    ref = task.remote(base, shape, part, str(store.root), index, board, threads, incarnations)
                    running[ref] = index
                ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_SECONDS)
                for ref in ready:
                    index = running.pop(ref)
                    stored = _result(ray, ref)
                    finished.add(index)
                    for user_id in stored:
                        trained.append(user_id)
                        if on_stored is not None:
                            on_stored(user_id)
                if on_progress is not None:
                    done = _steps_done(work, groups, finished, ray.get(board.snapshot.remote()))
                    if done != reported:
                        on_progress(done, work.steps())
                        reported = done
        finally:
            for ref in running:
                ray.cancel(ref, force=True)
            ray.kill(board)
            del base
        return trained


def _steps_done(
    work: TrainWork, groups: list[list[UserData]], finished: set[int], running: dict[int, int]
) -> int:
    """Steps of the finished groups (all of them) and of the running ones (as their tasks reported)."""
    return sum(work.steps(g) if i in finished else running.get(i, 0) for i, g in enumerate(groups))


def _part(work: TrainWork, group: list[UserData]) -> TrainWork:
    """The job's settings with only ``group``'s users (a task gets its own users' data, not everyone's)."""
    fingerprints = None
    if work.fingerprints is not None:
        fingerprints = {u.user_id: work.fingerprints[u.user_id] for u in group}
    return replace(work, users=tuple(group), fingerprints=fingerprints)


def _result(ray: Any, ref: Any) -> list[str]:
    """A finished task's stored users; a training error as itself, a lost worker as a ClusterError."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError:
        raise  # the training's own exception (Ray raises it as an instance of its class too)
    except ray.exceptions.RayError as error:
        raise ClusterError(f"a training group failed after its retries: {error}") from None


@contextlib.contextmanager
def runner_for(
    backend: str,
    group_users: int | None = None,
    workers: int | None = None,
    address: str | None = None,
) -> Iterator[TrainRunner]:
    """The runner a command's ``--backend`` names, for the block: local, or Ray workers on the instance
    at ``address`` (default: a new local one, shut down after). ``group_users`` None: the default."""
    group_users = group_users or DEFAULT_GROUP_USERS
    if check_backend(backend) == "local":
        yield LocalRunner(group_users)
        return
    with connected(address):
        yield RayRunner(group_users, workers=workers)
