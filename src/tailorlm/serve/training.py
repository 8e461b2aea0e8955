"""Background retraining: a user's new history retrains their module in a separate worker process (the
server's threads keep serving; a crash or a ``kill -9`` of the worker cannot take the server with it).

The worker writes the new version through the store (staged, fsynced, renamed, then one index
transaction), so whatever happens to it, the user is served by the old version or the new one. One job
runs per user at a time; history posted while it runs makes the job run once more when it ends.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from tailorlm.users.service import train_users

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"


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
    pid: int | None = None

    def to_dict(self) -> dict:
        return {"object": "training.job", **asdict(self)}


def _work(root: str, user_id: str) -> None:
    """The worker process: train one user from their current module on their whole history."""
    trained = train_users(root, [user_id], start_from_current=True)
    if user_id not in trained:
        raise SystemExit(3)  # nothing to train (no usable history): the job fails with a clear state


class TrainingJobs:
    """The retraining jobs of one server. ``on_state(state)`` counts outcomes for the metrics;
    ``current_version(user_id)`` reads the store after a job (the worker wrote it)."""

    def __init__(
        self,
        root: Path,
        current_version: Callable[[str], int | None],
        on_state: Callable[[str], None] = lambda state: None,
        target: Callable[[str, str], None] = _work,
    ) -> None:
        self.root = root
        self.current_version = current_version
        self.on_state = on_state
        self.target = target
        self._jobs: dict[str, TrainingJob] = {}
        self._active: dict[str, TrainingJob] = {}  # user id -> their running job
        self._again: set[str] = set()  # users whose history grew while their job ran
        self._processes: dict[str, multiprocessing.process.BaseProcess] = {}
        self._lock = threading.Lock()
        self._context = multiprocessing.get_context("spawn")  # no forked copy of the server's threads

    def start(self, user_id: str) -> TrainingJob:
        """A job for ``user_id``, or the running one (which then runs again for the newest history)."""
        with self._lock:
            running = self._active.get(user_id)
            if running is not None:
                self._again.add(user_id)
                return running
            job = TrainingJob(f"train-{uuid.uuid4().hex[:16]}", user_id, created=time.time())
            self._jobs[job.job_id] = job
            self._launch(job)
            return job

    def get(self, job_id: str) -> TrainingJob | None:
        with self._lock:
            return self._jobs.get(job_id)

    def cancel_user(self, user_id: str) -> None:
        """Forgetting a user stops their job: its output must not bring them back."""
        with self._lock:
            self._again.discard(user_id)
            process = self._processes.get(user_id)
        if process is not None:
            process.kill()
            process.join(timeout=30)

    def stop(self) -> None:
        with self._lock:
            processes = list(self._processes.values())
        for process in processes:
            process.kill()
            process.join(timeout=30)

    def _launch(self, job: TrainingJob) -> None:
        process = self._context.Process(target=self.target, args=(str(self.root), job.user_id), daemon=True)
        process.start()
        job.state, job.started, job.pid = RUNNING, time.time(), process.pid
        self._active[job.user_id] = job
        self._processes[job.user_id] = process
        self.on_state(RUNNING)
        threading.Thread(target=self._watch, args=(job, process), daemon=True).start()

    def _watch(self, job: TrainingJob, process: multiprocessing.process.BaseProcess) -> None:
        process.join()
        with self._lock:
            self._processes.pop(job.user_id, None)
            job.finished = time.time()
            if process.exitcode == 0:
                job.state, job.version = SUCCEEDED, self.current_version(job.user_id)
            else:
                job.state = FAILED
                job.error = (
                    "no history to train on"
                    if process.exitcode == 3
                    else f"the worker exited with {process.exitcode}"
                )
            self.on_state(job.state)
            self._active.pop(job.user_id, None)
            if job.user_id in self._again:
                self._again.discard(job.user_id)
                again = TrainingJob(f"train-{uuid.uuid4().hex[:16]}", job.user_id, created=time.time())
                self._jobs[again.job_id] = again
                self._launch(again)
