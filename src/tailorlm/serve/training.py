"""Background retraining: a user's new history retrains their module in a separate worker process (the
server's threads keep serving; a crash or a ``kill -9`` of the worker cannot take the server with it).

At most ``max_workers`` workers run at once, each loading one base model; users whose history grows
while the workers are busy wait in a queue, and the next worker trains all of them together, many users
per step, as ``tailorlm users train`` does. The worker writes each new version through the store (staged,
fsynced, renamed, then one index transaction), so whatever happens to it, a user is served by the old
version or the new one. A job succeeded when its user has a version newer than the job's start. History
posted while a user's job runs makes them train once more afterwards.

A worker never outlives the server that started it: it watches its parent (``_orphan_watch``) and exits
the moment the parent is gone (a ``kill -9`` included), and checks again before every write. Forgetting a
user cancels their job (``cancel_user``, or found at the end when another process forgot them): its
result is discarded (the store refuses a version of a forgotten user), and its records are dropped.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tailorlm.users.service import train_users

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
MAX_USERS_PER_WORKER = 32
ORPHAN_POLL = 0.1  # seconds between a worker's checks that its server still runs


@dataclass
class TrainingJob:
    job_id: str
    user_id: str
    state: str = QUEUED
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    version: int | None = None  # the version the job produced
    error: str | None = None
    pid: int | None = None  # the worker process (shared by the users it trains together)

    def to_dict(self) -> dict:
        return {"object": "training.job", **asdict(self)}


class Orphaned(SystemExit):
    """The server that started this worker is gone."""


def _orphan_watch(parent: int) -> Callable[[], None]:
    """In a worker: exit as soon as ``parent`` (the server's pid) is no longer this process's parent,
    checked every ``ORPHAN_POLL`` seconds by a thread, and return the same check to run before each
    write. (The parent's death makes the kernel hand the worker to another parent. ``PR_SET_PDEATHSIG``
    would fire when the server's thread that started the worker ends, not the server, and the server
    starts workers from short-lived threads.)"""

    def check() -> None:
        if os.getppid() != parent:
            raise Orphaned(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(ORPHAN_POLL)
        os._exit(1)  # at once: no cleanup may write anything for a server that is gone

    check()
    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()
    return check


def _work(root: str, user_ids: Sequence[str], parent: int) -> None:
    """The worker process: train the users from their current modules on their whole history."""
    guard = _orphan_watch(parent)
    train_users(root, list(user_ids), start_from_current=True, write_guard=guard)


class TrainingJobs:
    """The retraining jobs of one server. ``current`` reads a user's current version and when it was
    made (the worker wrote it); ``forgotten`` whether a user was forgotten (by this server or another
    process); ``on_state`` counts outcomes for the metrics. ``target(root, user_ids, parent pid)`` runs
    in the worker."""

    def __init__(
        self,
        root: str | Path,  # what the workers open the store by: a folder or a URL
        current: Callable[[str], tuple[int, float] | None],
        on_state: Callable[[str], None] = lambda state: None,
        max_workers: int = 1,
        target: Callable[[str, Sequence[str], int], None] = _work,
        forgotten: Callable[[str], bool] = lambda user_id: False,
    ) -> None:
        self.root = root
        self.current = current
        self.forgotten = forgotten
        self.on_state = on_state
        self.max_workers = max_workers
        self.target = target
        self._jobs: dict[str, TrainingJob] = {}
        self._active: dict[str, TrainingJob] = {}  # user id -> their queued or running job
        self._queue: list[TrainingJob] = []
        self._again: set[str] = set()  # users whose history grew while their job ran
        self._processes: dict[int, multiprocessing.process.BaseProcess] = {}  # pid -> worker
        self._stopped_for: dict[int, str] = {}  # pid -> the forgotten user it was stopped for
        self._lock = threading.Lock()
        self._context = multiprocessing.get_context("spawn")  # no forked copy of the server's threads

    def start(self, user_id: str) -> TrainingJob:
        """A job for ``user_id``: a new one, or the one already queued or running (which then runs
        again for the newest history)."""
        with self._lock:
            active = self._active.get(user_id)
            if active is not None:
                if active.state == RUNNING:
                    self._again.add(user_id)
                return active
            job = self._queued(user_id)
            self._dispatch()
            return job

    def get(self, job_id: str) -> TrainingJob | None:
        with self._lock:
            return self._jobs.get(job_id)

    def cancel_user(self, user_id: str) -> None:
        """Forgetting a user stops their job (its output would be refused by the store anyway) and drops
        every record of their jobs. A worker that trains them with others is stopped too; the others are
        queued again."""
        with self._lock:
            self._again.discard(user_id)
            job = self._active.get(user_id)
            if job is not None and job.state == QUEUED:
                self._queue.remove(job)
                self._active.pop(user_id)
                self._cancelled(job)
            process = self._processes.get(job.pid) if job is not None and job.state == RUNNING else None
            if process is not None:
                self._stopped_for[process.pid] = user_id
            self._drop_records(user_id)
        if process is not None:
            process.kill()
            process.join(timeout=30)

    def stop(self) -> None:
        with self._lock:
            processes = list(self._processes.values())
            self._queue.clear()
        for process in processes:
            process.kill()
            process.join(timeout=30)

    # ---- under the lock --------------------------------------------------------------------------

    def _queued(self, user_id: str) -> TrainingJob:
        job = TrainingJob(f"train-{uuid.uuid4().hex[:16]}", user_id, created=time.time())
        self._jobs[job.job_id] = job
        self._active[user_id] = job
        self._queue.append(job)
        return job

    def _dispatch(self) -> None:
        while self._queue and len(self._processes) < self.max_workers:
            batch, self._queue = self._queue[:MAX_USERS_PER_WORKER], self._queue[MAX_USERS_PER_WORKER:]
            users = [job.user_id for job in batch]
            process = self._context.Process(
                target=self.target, args=(str(self.root), users, os.getpid()), daemon=True
            )
            process.start()
            self._processes[process.pid] = process
            for job in batch:
                job.state, job.started, job.pid = RUNNING, time.time(), process.pid
                self.on_state(RUNNING)
            threading.Thread(target=self._watch, args=(batch, process), daemon=True).start()

    def _watch(self, batch: list[TrainingJob], process: multiprocessing.process.BaseProcess) -> None:
        process.join()
        # Read outside the lock: what the worker left, and who was forgotten meanwhile (by this server,
        # or by another process such as ``tailorlm users delete``).
        outcomes = {job.user_id: self.current(job.user_id) for job in batch}
        gone = {job.user_id for job in batch if self.forgotten(job.user_id)}
        with self._lock:
            self._processes.pop(process.pid, None)
            stopped_for = self._stopped_for.pop(process.pid, None)
            for job in batch:
                if job.user_id == stopped_for or job.user_id in gone:
                    self._cancelled(job)
                    self._active.pop(job.user_id, None)
                    self._again.discard(job.user_id)
                    self._drop_records(job.user_id)
                elif stopped_for is not None:
                    job.state, job.pid = QUEUED, None  # stopped for someone else: train again
                    self._queue.append(job)
                else:
                    self._settle(job, outcomes[job.user_id], process.exitcode)
            self._dispatch()

    def _cancelled(self, job: TrainingJob) -> None:
        job.state, job.finished = CANCELLED, time.time()
        self.on_state(CANCELLED)
        log.info("training job %s cancelled: its user was forgotten", job.job_id)  # never the user's id

    def _drop_records(self, user_id: str) -> None:
        """Forget every job record of ``user_id``: a job says who trained when, which is theirs too."""
        for job_id in [job_id for job_id, job in self._jobs.items() if job.user_id == user_id]:
            del self._jobs[job_id]

    def _settle(self, job: TrainingJob, current: tuple[int, float] | None, exitcode: int | None) -> None:
        job.finished = time.time()
        if current is not None and current[1] >= (job.started or 0.0):
            job.state, job.version = SUCCEEDED, current[0]
        else:
            job.state = FAILED
            job.error = (
                f"the worker exited with {exitcode}"
                if exitcode
                # The worker stores nothing for a user without training items, or whose training
                # diverged (``users.training.DIVERGED``); either way the previous version stays current.
                else "nothing was stored: no training items, or the training diverged (NaN or infinite "
                "weights); the previous version is kept"
            )
        self.on_state(job.state)
        self._active.pop(job.user_id, None)
        if job.user_id in self._again:
            self._again.discard(job.user_id)
            self._queued(job.user_id)
