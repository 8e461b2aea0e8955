"""The one thread that runs the engine: admits waiting requests into the running batch between decode
steps (continuous batching), answers label-restricted requests by scoring the labels, streams each row's
text to its request, and releases a row's slot the moment it finishes.

Slots: every request pins its user's module version for its whole life, so it finishes on the version it
started with even if a retrain lands meanwhile; a module is keyed by user and version, so the next request
loads the new one and the old one is evicted when nobody uses it. A request whose user cannot get a slot
(all pinned) waits while requests of resident users go ahead.

Requests come from the server's event loop (``submit``); everything that touches the engine or the slots
runs on the scheduler thread, including forgetting a user (``forget``), so no lock is held across a
forward pass.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Protocol, runtime_checkable

from tailorlm.engine.continuous import DecodeRow, RunningBatch, Sampling
from tailorlm.engine.engine import Engine
from tailorlm.engine.slots import SlotManager, SlotsFullError
from tailorlm.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 16  # rows decoded together
    wait_ms: float = 10.0  # how long an idle scheduler waits for more arrivals before a prefill
    max_queue: int = 256  # waiting requests beyond this are refused with 429
    # One user's waiting requests beyond this are refused with 429, so one user's flood cannot take the
    # whole queue from everyone else.
    max_user_queue: int = 64
    # With work pending, a loop that has not advanced for this long is stalled: /health says so (503) and
    # /metrics counts it. A step is one forward pass, so this is well above the slowest prefill.
    watchdog_seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1 or self.max_user_queue < 1:
            raise ValueError("max_batch, max_queue and max_user_queue must be at least 1")
        if not self.watchdog_seconds > 0:
            raise ValueError(f"watchdog_seconds must be positive, not {self.watchdog_seconds}")


class JobError(Exception):
    """Why a job was not answered, in the scheduler's own terms (the HTTP front maps a ``reason`` to a
    status: ``app._job_error``). ``retry_after`` (seconds): the job may succeed if sent again then."""

    REASONS = (
        "queue_full",  # too many requests waiting
        "user_queue_full",  # too many of this user's requests waiting
        "deleted",  # the user was forgotten while the job waited or ran
        "shutting_down",
        "module_unavailable",  # the user's module could not be loaded (the log says why)
        "failed",  # something failed while serving this job (the log says what)
        "cancelled",  # the client went away
        "replica_unavailable",  # the replica serving this user is down or restarting
        "unsupported",  # this scheduler cannot do what was asked
    )

    def __init__(self, reason: str, message: str, retry_after: float | None = None) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown job error reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


@dataclass
class Event:
    """What a request hears back: text pieces, then one final event (done or error)."""

    text: str = ""
    finish: str | None = None  # "stop" | "length" on the final event
    prompt_tokens: int = 0
    completion_tokens: int = 0
    scores: dict[str, float] | None = None  # label -> log-probability (label-restricted requests)
    error: JobError | None = None

    @property
    def final(self) -> bool:
        return self.finish is not None or self.error is not None


REQUEST = {"request": True}  # the metadata of a Job field that is part of the request itself


@dataclass(eq=False)
class Job:
    """One request's work: whose module (user, version, bank), the prompt, and where events go. The
    fields marked ``REQUEST`` are the request itself, what a front sends to the replica that serves it
    (``request_fields``); the rest is this process's bookkeeping."""

    user_id: str = field(metadata=REQUEST)
    version: int = field(metadata=REQUEST)
    bank: int = field(metadata=REQUEST)  # the engine's bank of the user's kind; -1 for the bare base model
    prompt_ids: list[int] = field(metadata=REQUEST)
    emit: Callable[[Event], None]
    sampling: Sampling = field(default_factory=Sampling, metadata=REQUEST)
    stops: tuple[str, ...] = field(default=(), metadata=REQUEST)
    labels: tuple[str, ...] | None = field(default=None, metadata=REQUEST)
    prompt_text: str = field(default="", metadata=REQUEST)
    created: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    slot: int = 0  # the engine's global slot, once pinned
    row: DecodeRow | None = None
    pins: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    sent: int = 0  # characters of the decoded text already emitted
    first_token: float | None = None
    placed_on: str | None = None  # the replica a front routed it to (``cluster.serving``); None: here

    @property
    def slot_key(self) -> str:
        return module_key(self.user_id, self.version)

    @classmethod
    def request_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.metadata.get("request"))


def module_key(user_id: str, version: int) -> str:
    """The slot manager's name for one version of one user's module (the version first: ids may hold ':')."""
    return f"{version}:{user_id}"


def key_user(key: str) -> tuple[str, int]:
    version, _, user_id = key.partition(":")
    return user_id, int(version)


@runtime_checkable
class JobScheduler(Protocol):
    """What the HTTP front (``serve.app``, ``serve.users_api``, ``serve.server``) calls on whatever runs its
    jobs: tailorlm's ``Scheduler``, the Ray front's ``cluster.serving.RemoteScheduler``, and the load
    tests' baselines (``perf.serve``). ``submit`` and ``cancel`` are called on the front's event loop, the
    others from any thread. A job that is not answered hears why as a ``JobError`` event; ``submit``
    raises one for a job refused outright (a full queue)."""

    def start(self) -> None: ...

    def stop(self) -> None:
        """Stop serving, let go of the threads (tailorlm's answers the jobs left: ``shutting_down``)."""
        ...

    def submit(self, job: Job) -> None: ...

    def cancel(self, job: Job) -> None:
        """The client went away: stop working on ``job`` (it hears ``cancelled`` or nothing)."""
        ...

    def pending(self) -> int:
        """Jobs submitted and not yet answered."""
        ...

    def forget(self, user_id: str) -> int:
        """Answer the user's jobs with ``deleted`` and reset every slot holding their module; returns how
        many slots were cleared (a ``JobError`` ``unsupported`` from a scheduler that cannot)."""
        ...

    def stalled_for(self) -> float:
        """Seconds the engine loop has not advanced with work pending (0: idle, advancing, or no loop of
        its own to watch); ``/health`` reports a stall past ``SchedulerConfig.watchdog_seconds``."""
        ...


class JobQueue:
    """The waiting requests and the one thread that serves them: what every scheduler of this process
    shares (``submit`` from request threads, ``start`` / ``stop``, the queue limit, the watchdog).
    Subclasses implement ``_loop`` and ``forget``, and then are a ``JobScheduler``."""

    thread_name = "tailorlm-scheduler"

    def __init__(self, config: SchedulerConfig, metrics: ServeMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._advanced = time.monotonic()  # when the loop last finished a step (or found nothing to do)
        self._stalled = False  # in a stall the watchdog has already counted
        self._watchdog = threading.Thread(
            target=self._watch, name=f"{self.thread_name}-watchdog", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        self._watchdog.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=30)
        self._watchdog.join(timeout=5)

    def stalled_for(self) -> float:
        """Seconds the loop has not advanced while work was pending (0 when idle or advancing)."""
        if not self.pending():
            return 0.0
        return max(0.0, time.monotonic() - self._advanced)

    def _tick(self) -> None:
        """The loop made progress (a step, an admission, or it is idle): the watchdog's clock restarts."""
        self._advanced = time.monotonic()
        self._stalled = False

    def _watch(self) -> None:
        """Count each stall once and log where the loop is stuck (its stack), so it can be diagnosed."""
        limit = self.config.watchdog_seconds
        while not self._stopping:
            time.sleep(min(1.0, limit / 4))
            if self._stalled or self.stalled_for() <= limit:
                continue
            self._stalled = True
            self.metrics.watchdog_stalls.inc()
            frame = sys._current_frames().get(self._thread.ident or -1)
            where = "".join(traceback.format_stack(frame)) if frame is not None else "(not running)"
            log.error(
                "the engine loop has not advanced for %.0f s with work pending; it is at:\n%s", limit, where
            )

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._waiting) >= self.config.max_queue:
                raise JobError(
                    "queue_full",
                    f"the server's queue is full ({self.config.max_queue} requests waiting); retry shortly",
                    retry_after=1.0,
                )
            if (
                sum(1 for waiting in self._waiting if waiting.user_id == job.user_id)
                >= self.config.max_user_queue
            ):
                raise JobError(
                    "user_queue_full",
                    f"this model has {self.config.max_user_queue} requests waiting already; retry shortly",
                    retry_after=1.0,
                )
            self._waiting.append(job)
            self.metrics.queue_depth.set(len(self._waiting))
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client went away: the job is dropped at the next step boundary."""
        job.cancelled = True
        with self._cond:
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return len(self._waiting)

    def _loop(self) -> None:
        raise NotImplementedError


class Scheduler(JobQueue):
    def __init__(
        self,
        engine: Engine,
        managers: Sequence[SlotManager],
        config: SchedulerConfig,
        metrics: ServeMetrics,
    ) -> None:
        self.engine = engine
        self.managers = list(managers)  # one per bank, in the engine's bank order
        self.running = RunningBatch(engine)
        self._jobs: dict[int, Job] = {}  # id(row) -> job, for rows in the running batch
        self._tasks: list[Callable[[], None]] = []  # work that must run on this thread (forgetting)
        super().__init__(config, metrics)

    # ---- from other threads ----------------------------------------------------------------------

    def run_here(self, task: Callable[[], object], timeout: float = 60.0) -> object:
        """Run ``task`` on the scheduler thread between steps and return its result (or raise its error)."""
        done = threading.Event()
        outcome: dict[str, object] = {}

        def wrapped() -> None:
            try:
                outcome["value"] = task()
            except BaseException as error:
                outcome["error"] = error
            finally:
                done.set()

        with self._cond:
            self._tasks.append(wrapped)
            self._cond.notify_all()
        if not done.wait(timeout):
            raise TimeoutError("the scheduler did not run the task in time")
        if "error" in outcome:
            raise outcome["error"]  # type: ignore[misc]
        return outcome.get("value")

    def forget(self, user_id: str) -> int:
        """Cancel the user's requests and reset every slot that holds any version of their module to the
        identity. Returns how many slots were cleared."""
        return int(self.run_here(lambda: self._forget(user_id)))  # type: ignore[arg-type]

    def pending(self) -> int:
        with self._cond:
            return len(self._waiting) + len(self.running)

    # ---- the scheduler thread --------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._tasks or self._waiting or self.running.rows):
                    self._tick()
                    self._cond.wait()
                if self._stopping:
                    break
                tasks, self._tasks = self._tasks, []
                if not self.running.rows and self._waiting and not tasks and self._should_wait():
                    continue
            for task in tasks:
                task()
            try:
                self._admit()
                if self.running.rows:
                    self._drop_cancelled()
                    self.metrics.batch_size.observe(len(self.running))
                    self._deliver(self.running.step())
            except Exception:  # a failing forward must not take the server down
                log.exception("the scheduler's step failed")
                self._fail_running()
            self._tick()
        self._fail_all(JobError("shutting_down", "the server is shutting down"))

    def _should_wait(self) -> bool:
        """Idle and too few arrivals yet: give others ``wait_ms`` to arrive so they prefill together."""
        if len(self._waiting) >= self.config.max_batch:
            return False
        left = self._waiting[0].created + self.config.wait_ms / 1000 - time.perf_counter()
        if left <= 0:
            return False
        self._cond.wait(left)
        return True

    def _admit(self) -> None:
        with self._cond:
            room = self.config.max_batch - len(self.running)
            candidates = []
            while self._waiting and len(candidates) < room:
                job = self._waiting.popleft()
                if not job.cancelled:
                    candidates.append(job)
        # Loading modules (a read and a checksum each) happens outside the lock, so the request threads
        # can keep submitting meanwhile.
        admitted, scoring, blocked = self._pin_all(candidates)
        with self._cond:
            self._waiting.extendleft(reversed(blocked))  # they keep their place in the queue
            self.metrics.queue_depth.set(len(self._waiting))
        if scoring:
            self._score(scoring)
        rows = [row for row in map(self._new_row, admitted) if row is not None]
        if rows:
            self.metrics.prefill_rows.observe(len(rows))
            self._prefill(rows)

    def _new_row(self, job: Job) -> DecodeRow | None:
        """The job's row in the running batch, or None when it cannot have one (the job is answered)."""
        try:
            job.row = DecodeRow(job.prompt_ids, job.slot, job.sampling)
        except Exception:
            log.exception("the row of a %s request could not be made", job.user_id)
            self._finish(job, Event(error=_failed()))
            return None
        self._jobs[id(job.row)] = job
        return job.row

    def _prefill(self, rows: list[DecodeRow]) -> None:
        """Join ``rows`` to the running batch. A prefill that fails is tried again row by row, so only the
        rows that fail alone are answered with an error (a failed prefill joins nothing)."""
        try:
            produced = self.running.add(rows)
        except Exception:
            if len(rows) == 1:
                log.exception("prefilling a row failed")
                self._finish(self._jobs[id(rows[0])], Event(error=_failed()))
                return
            for row in rows:
                self._prefill([row])
            return
        self._deliver(produced)

    def _pin_all(self, jobs: list[Job]) -> tuple[list[Job], list[Job], list[Job]]:
        """Pin each job's module: (jobs to decode, jobs to score labels for, jobs whose user gets no
        slot until a running row finishes). A job whose module cannot be loaded is answered here."""
        admitted: list[Job] = []
        scoring: list[Job] = []
        blocked: list[Job] = []
        for job in jobs:
            try:
                self._pin(job)
            except SlotsFullError:
                blocked.append(job)  # its user waits for a slot; others go ahead
                continue
            except Exception:
                log.exception("loading %s failed", job.slot_key)
                _emit(job, Event(error=_module_error(job)))
                continue
            (scoring if job.labels else admitted).append(job)
        return admitted, scoring, blocked

    def _pin(self, job: Job) -> None:
        if job.bank < 0:  # no module: the bare base model (slot 0), e.g. the upper bound of a load test
            job.slot = 0
            return
        manager = self.managers[job.bank]
        hits, misses = manager.hits, manager.misses
        placed = job.pins.enter_context(manager.pinned([job.slot_key]))
        job.slot = self.engine.space.global_slot(job.bank, placed[job.slot_key])
        self.metrics.slot_hits.inc(manager.hits - hits)
        self.metrics.slot_misses.inc(manager.misses - misses)

    def _score(self, jobs: list[Job]) -> None:
        """Label-restricted requests: every label's log-probability, one engine call per label set."""
        groups: dict[tuple[str, ...], list[Job]] = {}
        for job in jobs:
            groups.setdefault(job.labels, []).append(job)  # type: ignore[arg-type]
        for labels, group in groups.items():
            self._score_group(labels, group)

    def _score_group(self, labels: tuple[str, ...], group: list[Job]) -> None:
        """One engine call for jobs with the same labels; when it fails, each job alone, so only the jobs
        that fail alone are answered with an error."""
        try:
            scores = self.engine.score_labels(
                [job.prompt_text for job in group], [job.slot for job in group], labels
            )
        except Exception:
            if len(group) == 1:
                log.exception("scoring labels failed")
                self._finish(group[0], Event(error=_failed()))
            else:
                for job in group:
                    self._score_group(labels, [job])
            return
        for job, values in zip(group, scores, strict=True):
            best = max(range(len(labels)), key=values.__getitem__)
            self._finish(
                job,
                Event(
                    text=labels[best],
                    finish="stop",
                    prompt_tokens=len(job.prompt_ids),
                    completion_tokens=len(
                        self.engine.tokenizer(labels[best], add_special_tokens=False)["input_ids"]
                    ),
                    scores=dict(zip(labels, values, strict=True)),
                ),
            )

    def _deliver(self, produced: Sequence[tuple[DecodeRow, int]]) -> None:
        now = time.perf_counter()
        stopped = []
        for row, _token in produced:
            job = self._jobs.get(id(row))
            if job is None:
                continue
            if row.finish_reason == "error":  # this row alone failed (the batch goes on without it)
                log.error("decoding a %s request failed: %r", job.user_id, row.error)
                self._finish(job, Event(error=_failed()))
                continue
            if job.first_token is None:
                job.first_token = now
                self.metrics.time_to_first_token.observe(now - job.created)
            text, stop_hit = self._new_text(job, final=row.finish_reason is not None)
            if stop_hit and row.finish_reason is None:
                stopped.append(row)
            if stop_hit or row.finish_reason:
                self._finish(
                    job,
                    Event(
                        text=text,
                        finish="stop" if stop_hit else row.finish_reason,
                        prompt_tokens=len(job.prompt_ids),
                        completion_tokens=len(row.tokens),
                    ),
                )
            elif text:
                _emit(job, Event(text=text))
        self.running.drop(stopped)

    def _new_text(self, job: Job, final: bool) -> tuple[str, bool]:
        """The text to send now, and whether a stop string ended the row. Text that could be the start of
        a stop string, or half of a multi-byte character, is held back until it is decided."""
        row = job.row
        text = self.engine.tokenizer.decode(row.tokens, skip_special_tokens=True)
        hits = [i for i in (text.find(stop) for stop in job.stops) if i >= 0]
        if hits:
            end, stopped = min(hits), True
        elif final:
            end, stopped = len(text), False
        else:
            hold = max((len(stop) - 1 for stop in job.stops), default=0)
            end, stopped = len(text) - hold, False
            if text.endswith("\ufffd"):
                end = min(end, len(text) - 1)
        piece = text[job.sent : max(end, job.sent)]
        job.sent = max(end, job.sent)
        return piece, stopped

    def _finish(self, job: Job, event: Event) -> None:
        if job.row is not None:
            self._jobs.pop(id(job.row), None)
        job.pins.close()  # unpin: the slot may be evicted (or, if its version was replaced, freed)
        self.metrics.latency.observe(time.perf_counter() - job.created)
        _emit(job, event)

    def _drop_cancelled(self) -> None:
        gone = [row for row in self.running.rows if self._jobs[id(row)].cancelled]
        for row in gone:
            self._finish(
                self._jobs[id(row)], Event(error=JobError("cancelled", "the client closed the request"))
            )
        self.running.drop(gone)

    def _forget(self, user_id: str) -> int:
        doomed = [row for row in self.running.rows if self._jobs[id(row)].user_id == user_id]
        for row in doomed:
            self._finish(self._jobs[id(row)], Event(error=_deleted(user_id)))
        self.running.drop(doomed)
        with self._cond:
            kept = deque()
            for job in self._waiting:
                if job.user_id == user_id:
                    _emit(job, Event(error=_deleted(user_id)))
                else:
                    kept.append(job)
            self._waiting = kept
        cleared = 0
        for manager in self.managers:
            for key in manager.resident():
                if key_user(key)[0] == user_id:
                    manager.evict(key)  # the slot's tensors become the identity
                    cleared += 1
        return cleared

    def _fail_running(self) -> None:
        """A decode step failed for the whole batch (one forward pass: no row to blame): its rows are
        answered with a 500, every pin and row they held is released, and the loop starts afresh."""
        for row in list(self.running.rows):
            job = self._jobs.get(id(row))
            if job is not None:
                self._finish(job, Event(error=_failed()))
        self._jobs.clear()
        self.running = RunningBatch(self.engine)

    def _fail_all(self, error: JobError) -> None:
        for row in list(self.running.rows):
            job = self._jobs.get(id(row))
            if job is not None:
                self._finish(job, Event(error=error))
        with self._cond:
            for job in self._waiting:
                _emit(job, Event(error=error))
            self._waiting.clear()


def _deleted(user_id: str) -> JobError:
    return JobError("deleted", f"user {user_id!r} was deleted")


def _module_error(job: Job) -> JobError:
    # What failed (a path, a checksum) stays in the log: the client learns only that it did.
    return JobError(
        "module_unavailable", f"the module of {job.user_id!r} version {job.version} could not be loaded"
    )


def _failed() -> JobError:
    """Why a job whose work failed on the server's side is not answered: only that it failed (the detail,
    which may name files or internals, is logged where it happened)."""
    return JobError("failed", "the server failed to answer this request; it was logged")


def _emit(job: Job, event: Event) -> None:
    """Send ``event`` to the job's request; a request whose listener is gone (its event loop closed) must
    not fail the loop that serves everyone."""
    try:
        job.emit(event)
    except Exception:
        log.warning("could not deliver an event to a %s request", job.user_id, exc_info=True)
