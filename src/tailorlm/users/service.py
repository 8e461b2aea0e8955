"""The users of one module store and everything done to them: adding and importing users with their
history, listing them, training their modules many users per step, rolling back, forgetting, API keys.

The command line (``tailorlm users ...``) and the server both call ``UserService``; neither holds user
logic of its own. Everything the service knows lives in the store (``ModuleStore`` and its index):
the store-wide settings (which task the users came from, so a later ``train`` or a server renders a
user's history into the same prompts; the base model; the default module spec) in the index's ``meta``
table, each user's own module spec in their ``users`` row. So a worker process given only the store's
root can train (``train_users``).

A user needs training when they have no module, when their history changed since their current module
was trained (the module's version records the fingerprint of the data it saw), or when their module
spec changed. Each trained user is stored the moment they finish, with that fingerprint, so a killed
``train`` started again trains only the users it had not finished.

``UserService`` is the front; its parts live beside it, one seam each: ``users.settings`` (the store and
its store-wide settings), ``users.lifecycle`` (who exists: adding, importing, history, keys, versions,
forgetting), ``users.training`` (training and profiles), ``users.history`` (records, examples,
fingerprints) and ``users.identity`` (the id rule and where a user's files live).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from tailorlm.methods.deps import BaseLoader, MethodSettings
from tailorlm.store.store import ModuleStore
from tailorlm.train.jobs import LocalRunner, TrainRunner
from tailorlm.users.history import HISTORY_SPLITS, fingerprint, to_example, to_record
from tailorlm.users.identity import MAX_USER_ID, check_user_id
from tailorlm.users.lifecycle import PROFILE_FILE, Forgotten, ImportResult, UserInfo
from tailorlm.users.settings import (
    DEFAULT_KIND,
    SETTINGS_KEY,
    TASK_ADAPTER_FOLDER,
    ServiceSettings,
    check_label_fit,
    default_spec_dict,
    read_blend_part,
    read_collab_part,
    resolve_spec,
)
from tailorlm.users.training import Training, TrainOutcome

__all__ = [
    "DEFAULT_KIND",
    "HISTORY_SPLITS",
    "MAX_USER_ID",
    "PROFILE_FILE",
    "SETTINGS_KEY",
    "TASK_ADAPTER_FOLDER",
    "Forgotten",
    "ImportResult",
    "ServiceSettings",
    "TrainOutcome",
    "UserInfo",
    "UserService",
    "check_label_fit",
    "check_user_id",
    "default_spec_dict",
    "fingerprint",
    "read_blend_part",
    "read_collab_part",
    "resolve_spec",
    "to_example",
    "to_record",
    "train_users",
]


class UserService(Training):
    """The users of the store at ``store`` (a ``ModuleStore``, or its root: a folder or an fsspec URL;
    ``index`` as ``ModuleStore`` takes it, None finding the index the root records). ``load_base`` builds
    a fresh base model per call (tests hand in the tiny one); by default the store's base model is loaded
    on ``device`` in ``dtype``. ``method_settings`` gives the training defaults (epochs, batch size, users
    per step, prompt length) the benchmark's per-user methods use. ``runner`` decides where training
    groups run (default: this process; ``cluster.training.RayRunner``: Ray workers)."""

    def __init__(
        self,
        store: ModuleStore | str | Path,
        load_base: BaseLoader | None = None,
        method_settings: MethodSettings | None = None,
        device: str | None = None,
        dtype: str | None = None,
        index: str | None = None,
        runner: TrainRunner | None = None,
    ) -> None:
        self.store = store if isinstance(store, ModuleStore) else ModuleStore(store, index=index)
        self.method_settings = method_settings or MethodSettings()
        self.runner = runner or LocalRunner()
        self._load_base = load_base
        self._placement = (device, dtype)


def train_users(
    root: str | Path,
    user_ids: Sequence[str] | None = None,
    start_from_current: bool = False,
    write_guard: Callable[[], None] | None = None,
) -> list[str]:
    """Train ``user_ids`` (default: every user whose module is out of date) of the store at ``root``,
    in this process: everything needed (task, base model, specs) is read from the store, so a server
    runs this in a worker process. Users forgotten before or while they train are left out (their
    result is discarded: the store refuses it). ``write_guard`` runs before every write (a worker's
    check that its server still runs). Returns the ids that were trained."""
    service = UserService(root)
    service.store.write_guard = write_guard
    try:
        if user_ids is not None:
            user_ids = [user_id for user_id in user_ids if service.index.has_user(user_id)]
            if not user_ids:
                return []
        return service.train(user_ids, start_from_current=start_from_current).trained
    finally:
        service.close()
