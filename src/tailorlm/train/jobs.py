"""Resumable training jobs: train every user whose module the store does not have yet, storing each
module the moment its user finishes, so a killed job restarts where it stopped."""

from __future__ import annotations

from collections.abc import Sequence

from tailorlm.engine.engine import Engine
from tailorlm.progress import ProgressCallback
from tailorlm.store.index import VersionRecord
from tailorlm.store.store import ModuleStore
from tailorlm.train.trainer import MultiUserTrainer, TrainConfig, UserData, UserResult


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


def train_job(
    engine: Engine,
    users: Sequence[UserData],
    config: TrainConfig,
    store: ModuleStore,
    on_progress: ProgressCallback | None = None,
) -> list[str]:
    """Train the users ``store`` has no complete module for; returns the ids that were trained."""
    pending = [u for u in users if not store.has(u.user_id)]

    MultiUserTrainer(engine, config).run(
        pending, on_done=lambda result: store_result(store, engine, result), on_progress=on_progress
    )
    return [u.user_id for u in pending]
