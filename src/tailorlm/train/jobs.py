"""Resumable training jobs: train every user whose module the store does not have yet, storing each
module the moment its user finishes, so a killed job restarts where it stopped.

A job (``TrainWork``) is cut into groups of at most ``group_users`` users, in the order given
(``plan_groups``); each group trains on one engine, ``users_per_step`` users per optimizer step. A runner
decides where the groups train: ``LocalRunner`` one after the other in this process, on the engine it is
handed; ``tailorlm.cluster.training.RayRunner`` on Ray workers, each with its own engine over a copy of
the base model taken from Ray's object store. Both cut the same groups and train each the same way, so the
same seed gives the same modules bit for bit at the same torch thread count: a user's result depends on
the rows batched beside theirs only through float rounding, which is why the grouping is part of the
contract and identical on both backends.

A group skips a user the job already stored (``done_since``): a group retried after its worker died, or
a job started again, trains only who is missing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tailorlm.engine.engine import Engine
from tailorlm.kinds import ModuleSpec
from tailorlm.models import BaseModel
from tailorlm.progress import ProgressCallback
from tailorlm.store.index import UnknownUserError, VersionRecord
from tailorlm.store.module_folder import NonFiniteModuleError
from tailorlm.store.store import ModuleStore
from tailorlm.train.trainer import MultiUserTrainer, TrainConfig, UserData, UserResult

# Users per group: a group is the unit a worker takes (and retries), and its engine keeps
# ``users_per_step`` of them training at once; 64 is 8 waves of the default 8 users per step, so a
# straggling last user idles few slots, and a worker's start (a base model copy) is spread over 64 users.
DEFAULT_GROUP_USERS = 64

StoredCallback = Callable[[str], None]  # a user id, called once their module is in the store


def store_result(
    store: ModuleStore, engine: Engine, result: UserResult, data_fingerprint: str | None = None
) -> VersionRecord:
    """Store one trained user's module as a new version, with its training record."""
    return store.put(
        result.user_id,
        engine.spec,
        result.module,
        model=engine.model,
        base_name=engine.base.name,
        meta=result.meta(),
        data_fingerprint=data_fingerprint,
    )


@dataclass(frozen=True)
class EngineShape:
    """How to build an engine equal to another one on a fresh copy of its base model (a worker's)."""

    spec: ModuleSpec
    slots: int  # slot 0 included, as ``Engine`` counts them
    max_length: int
    end_target_with_eos: bool
    share_prefix: bool

    @classmethod
    def of(cls, engine: Engine) -> EngineShape:
        return cls(
            engine.spec,
            engine.bank.slots,
            engine.max_length,
            engine.end_target_with_eos,
            engine.share_prefix,
        )

    def build(self, base: BaseModel) -> Engine:
        return Engine(
            base,
            self.spec,
            slots=self.slots,
            max_length=self.max_length,
            end_target_with_eos=self.end_target_with_eos,
            share_prefix=self.share_prefix,
        )


@dataclass(frozen=True)
class TrainWork:
    """One training job: its users' (prompt, target) pairs, the training settings, and per user the
    fingerprint of the data they train on (stored with their module; None: none recorded). Plain data,
    so a Ray worker receives it as it is."""

    config: TrainConfig
    users: Sequence[UserData]
    fingerprints: Mapping[str, str] | None = None
    started: float = field(default_factory=time.time)  # a module stored since then is this job's

    def steps(self, users: Sequence[UserData] | None = None) -> int:
        """Optimizer steps of ``users`` (default: all), as ``MultiUserTrainer`` counts them."""
        return sum(self.config.steps(len(u.train)) for u in users or self.users)

    def fingerprint(self, user_id: str) -> str | None:
        return None if self.fingerprints is None else self.fingerprints[user_id]


def plan_groups(users: Sequence[UserData], group_users: int) -> list[list[UserData]]:
    """``users`` in order, cut into groups of at most ``group_users``."""
    if group_users < 1:
        raise ValueError(f"a group holds at least one user, not {group_users}")
    return [list(users[i : i + group_users]) for i in range(0, len(users), group_users)]


def done_since(store: ModuleStore, work: TrainWork, user_id: str) -> bool:
    """Whether this job already stored ``user_id``: a current version made since the job started (with
    the job's data fingerprint, when it has one)."""
    record = store.current(user_id)
    if record is None or record.created < work.started or not store.has(user_id):
        return False
    return work.fingerprints is None or record.data_fingerprint == work.fingerprint(user_id)


def train_group(
    engine: Engine,
    store: ModuleStore,
    work: TrainWork,
    users: Sequence[UserData],
    on_progress: ProgressCallback | None = None,
    on_stored: StoredCallback | None = None,
) -> list[str]:
    """Train one group's users the job has not stored yet on ``engine``, storing each as they finish;
    returns their ids in the order they were stored, those an earlier try of the group stored first. A
    user forgotten meanwhile, or whose module came out non-finite (their training diverged), is not
    stored, and the others are."""
    done = {u.user_id for u in users if done_since(store, work, u.user_id)}
    pending = [u for u in users if u.user_id not in done]
    # Users an earlier try of this group stored (a Ray task retried after its worker died) count as
    # stored by it: that try's results never reached the caller.
    trained: list[str] = [u.user_id for u in users if u.user_id in done]

    def keep(result: UserResult) -> None:
        try:
            store_result(store, engine, result, work.fingerprint(result.user_id))
        except UnknownUserError:  # forgotten while training: the store refused the result, as it must
            return
        except NonFiniteModuleError:  # diverged: not stored (their previous version stays), the rest go on
            return
        trained.append(result.user_id)
        if on_stored is not None:
            on_stored(result.user_id)

    if pending:
        MultiUserTrainer(engine, work.config).run(pending, on_done=keep, on_progress=on_progress)
    return trained


class TrainRunner(Protocol):
    """Where a job's groups train. ``engine`` is an engine of the job's spec in this process, nothing
    trained in it yet; ``fresh_base`` loads another copy of its base model as it was before the engine
    wrapped it (a runner that trains elsewhere ships that copy). Progress is in optimizer steps of the
    whole job; ``on_stored`` hears of each stored user in this process."""

    group_users: int

    def train(
        self,
        engine: Engine,
        work: TrainWork,
        store: ModuleStore,
        fresh_base: Callable[[], BaseModel],
        on_progress: ProgressCallback | None = None,
        on_stored: StoredCallback | None = None,
    ) -> list[str]:
        """Train ``work``'s users; returns the ids stored, in the order they were."""


@dataclass
class LocalRunner:
    """Every group in this process, one after another, on the engine handed in (a finished user leaves
    their slot as the identity and the next group's trainer starts its optimizer afresh, so each group
    trains as it would on an engine of its own)."""

    group_users: int = DEFAULT_GROUP_USERS

    def train(
        self,
        engine: Engine,
        work: TrainWork,
        store: ModuleStore,
        fresh_base: Callable[[], BaseModel] | None = None,
        on_progress: ProgressCallback | None = None,
        on_stored: StoredCallback | None = None,
    ) -> list[str]:
        total, offset = work.steps(), 0
        trained: list[str] = []
        for group in plan_groups(work.users, self.group_users):
            report = None
            if on_progress is not None:
                report = _offset(on_progress, offset, total)
            trained += train_group(engine, store, work, group, report, on_stored)
            offset += work.steps(group)
        return trained


def _offset(callback: ProgressCallback, offset: int, total: int) -> ProgressCallback:
    """A group's progress (counted from zero) as progress of the whole job."""
    return lambda done, _group_total: callback(offset + done, total)


def train_job(
    engine: Engine,
    users: Sequence[UserData],
    config: TrainConfig,
    store: ModuleStore,
    on_progress: ProgressCallback | None = None,
    runner: TrainRunner | None = None,
    fresh_base: Callable[[], BaseModel] | None = None,
) -> list[str]:
    """Train the users ``store`` has no complete module for; returns the ids that were trained.
    ``runner`` (default: this process) needs ``fresh_base`` when it trains elsewhere."""
    pending = [u for u in users if not store.has(u.user_id)]
    if not pending:
        return []
    runner = runner or LocalRunner()
    return runner.train(engine, TrainWork(config, pending), store, fresh_base, on_progress)
