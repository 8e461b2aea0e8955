"""Background retraining: a user's new history retrains their module in a separate worker process (the
server's threads keep serving; a crash or a ``kill -9`` of the worker cannot take the server with it).

At most ``max_workers`` workers run at once, each loading one base model; users whose history grows
while the workers are busy wait in a queue, and the next worker trains all of them together, many users
per step, as ``tailorlm users train`` does. The worker writes each new version through the store (staged,
fsynced, renamed, then one index transaction), so whatever happens to it, a user is served by the old
version or the new one. A job succeeded when its user has a version newer than the job's start. History
posted while a user's job runs makes them train once more afterwards.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tailorlm.users.service import train_users

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"
MAX_USERS_PER_WORKER = 32


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


def _work(root: str, user_ids: Sequence[str]) -> None:
    """The worker process: train the users from their current modules on their whole history."""
    train_users(root, list(user_ids), start_from_current=True)


class TrainingJobs:
    """The retraining jobs of one server. ``current`` reads a user's current version and when it was
    made (the worker wrote it); ``on_state`` counts outcomes for the metrics."""

    def __init__(
        self,
        root: str | Path,  # what the workers open the store by: a folder or a URL
        current: Callable[[str], tuple[int, float] | None],
        on_state: Callable[[str], None] = lambda state: None,
        max_workers: int = 1,
        target: Callable[[str, Sequence[str]], None] = _work,
    ) -> None:
        self.root = root
        self.current = current
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
        """Forgetting a user stops their job: its output must not bring them back. A worker that trains
        them with others is stopped too; the others are queued again."""
        with self._lock:
            self._again.discard(user_id)
            job = self._active.get(user_id)
            if job is not None and job.state == QUEUED:
                self._queue.remove(job)
                self._active.pop(user_id)
            process = self._processes.get(job.pid) if job is not None and job.state == RUNNING else None
            if process is not None:
                self._stopped_for[process.pid] = user_id
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
            process = self._context.Process(target=self.target, args=(str(self.root), users), daemon=True)
            process.start()
            self._processes[process.pid] = process
            for job in batch:
                job.state, job.started, job.pid = RUNNING, time.time(), process.pid
                self.on_state(RUNNING)
            threading.Thread(target=self._watch, args=(batch, process), daemon=True).start()

    def _watch(self, batch: list[TrainingJob], process: multiprocessing.process.BaseProcess) -> None:
        process.join()
        outcomes = {job.user_id: self.current(job.user_id) for job in batch}  # read outside the lock
        with self._lock:
            self._processes.pop(process.pid, None)
            forgotten = self._stopped_for.pop(process.pid, None)
            for job in batch:
                if forgotten is not None and job.user_id != forgotten:
                    job.state, job.pid = QUEUED, None  # stopped for someone else: train again
                    self._queue.append(job)
                else:
                    self._settle(job, outcomes[job.user_id], process.exitcode)
            self._dispatch()

    def _settle(self, job: TrainingJob, current: tuple[int, float] | None, exitcode: int | None) -> None:
        job.finished = time.time()
        if current is not None and current[1] >= (job.started or 0.0):
            job.state, job.version = SUCCEEDED, current[0]
        else:
            job.state = FAILED
            job.error = (
                f"the worker exited with {exitcode}"
                if exitcode
                else "nothing was trained (no training items?)"
            )
        self.on_state(job.state)
        self._active.pop(job.user_id, None)
        if job.user_id in self._again:
            self._again.discard(job.user_id)
            self._queued(job.user_id)
