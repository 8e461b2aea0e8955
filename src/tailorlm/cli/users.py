"""The user store from the command line: ``tailorlm users add | import | list | show | train | rollback |
delete | key issue | key revoke``. Every command is a thin call into ``tailorlm.users.service``, which the
server calls too."""

from __future__ import annotations

import datetime
from dataclasses import asdict, replace
from pathlib import Path

import typer

from tailorlm import models, settings
from tailorlm.cli import app, console
from tailorlm.cli.common import (
    BACKEND_OPTION,
    DEVICE_OPTION,
    DTYPE_OPTION,
    GROUP_USERS_OPTION,
    JSON_OPTION,
    MODEL_OPTION,
    RAY_ADDRESS_OPTION,
    WORKERS_OPTION,
    user_errors,
)
from tailorlm.cluster.session import ClusterError
from tailorlm.cluster.training import runner_for
from tailorlm.device import DeviceError
from tailorlm.engine.bank import EngineError
from tailorlm.methods.deps import MethodSettings
from tailorlm.store.index import VersionRecord
from tailorlm.store.index_backends import StoreLocationError
from tailorlm.store.module_folder import ModuleFileError
from tailorlm.users.errors import UserError
from tailorlm.users.service import UserInfo, UserService, check_label_fit, read_blend_part, read_collab_part

users_app = typer.Typer(
    help="The users of a module store: add or import them, train their modules, roll back, forget, keys.",
    no_args_is_help=True,
)
key_app = typer.Typer(help="API keys: issue one (shown once) or revoke them.", no_args_is_help=True)
app.add_typer(users_app, name="users")
users_app.add_typer(key_app, name="key")

STORE_OPTION = typer.Option(
    None,
    "--store",
    "-s",
    help="The user store's folder, or an fsspec URL such as s3://bucket/store (default: $TAILORLM_STORE, "
    "else stores/default).",
    show_default=False,
)
INDEX_OPTION = typer.Option(
    None,
    "--index",
    help="Where a new store keeps its index: postgresql://USER@HOST/DATABASE (the password from PGPASSWORD "
    "or ~/.pgpass) or a SQLite file (default: the store's own index.sqlite3). Recorded in the store, so "
    "later commands, the server and its workers find it; $TAILORLM_INDEX_URL overrides it.",
    show_default=False,
)
# What a users command reports as one line: a mistake in what was asked, or a store or index that cannot
# be opened where it was said to be.
STORE_ERRORS = (UserError, StoreLocationError)
KIND_OPTION = typer.Option(
    None,
    "--kind",
    "-k",
    help="Module kind for these users: lora, ia3, prompt, bottleneck or label-bias (default: lora).",
)


def _service(store: str | None, **options) -> UserService:
    """The service of ``--store`` (``options``: ``UserService``'s, e.g. ``index``)."""
    return UserService(store or settings.default_store(), **options)


def _when(stamp: float) -> str:
    return datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M:%S")


@users_app.command("add")
def add_command(
    user: str = typer.Argument(..., help="The new user's id."),
    kind: str | None = KIND_OPTION,
    store: str | None = STORE_OPTION,
    index: str | None = INDEX_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Add one user (with no history yet: the server or `import` adds it)."""
    with user_errors(*STORE_ERRORS):
        info = _service(store, index=index).add(user, kind=kind)
    console.emit(info.to_dict(), as_json, lambda p: console.out.print(f"added user {p['user_id']!r}"))


@users_app.command("import")
def import_command(
    task: str = typer.Argument(..., help="Task name, e.g. verbagg, peftu:hatexplain, lamp:2."),
    data: Path | None = typer.Option(
        None, "--data", "-d", help="Folder with the task's files (PEFT-U, LaMP)."
    ),
    split: str | None = typer.Option(None, "--split", help="LaMP: train / dev / test. PEFT-U: no_leak."),
    users: str | None = typer.Option(None, "--users", help="Comma-separated user ids (default: all)."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Only the task's first N users."),
    kind: str | None = KIND_OPTION,
    model: str | None = MODEL_OPTION,
    seed: int = typer.Option(0, "--seed", help="Seed of the per-user splits the offline tasks make."),
    task_adapter: Path | None = typer.Option(
        None,
        "--task-adapter",
        help="OPPU: a bench run's task adapter (RUN/modules/task-adapter-TAG) or a LoRA or IA3 module "
        "folder, merged into the base before users train and are served; copied into the store. Only for "
        "a store without modules.",
    ),
    collab: Path | None = typer.Option(
        None,
        "--collab",
        help="Collab users' shared part: a bench run's modules/collab-shared-TAG folder (the trained MLP "
        "and the item factors users are folded in against), from the run whose --task-adapter is given; "
        "copied into the store.",
    ),
    blend: Path | None = typer.Option(
        None,
        "--blend",
        help="The stacked blend's part: a bench run's modules/blend-part-TAG folder (the item statistics "
        "and the fitted blender), from the run whose --task-adapter is given; copied into the store. A "
        "label request that names an item is then answered with the blend.",
    ),
    label_fit: str | None = typer.Option(
        None,
        "--label-fit",
        help="How label-bias users are fitted against the shared model: bias (a shrunk bias), fusion (the "
        "model fused with the user's label prior) or select (per user the best of those and the prior "
        "alone, on their own validation items). Default: bias.",
    ),
    store: str | None = STORE_OPTION,
    index: str | None = INDEX_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Import users and their train and validation items from a task; importing again adds nothing new."""
    with user_errors(*STORE_ERRORS):
        if users is not None and limit is not None:
            raise UserError("give --users or --limit, not both")
        chosen = [u.strip() for u in users.split(",") if u.strip()] if users is not None else limit
        if label_fit is not None:
            check_label_fit(label_fit)  # before the import, so a mistyped fit imports nothing
        spec = kind
        if collab is not None:  # read first: a damaged part imports nothing, and collab users take its spec
            part = read_collab_part(collab)
            spec = part.spec if kind == part.spec.kind else kind
        if blend is not None:  # read first too: a damaged part imports nothing
            read_blend_part(blend)
        service = _service(store, index=index)
        result = service.import_task(task, data_dir=data, split=split, users=chosen, kind=spec, seed=seed)
        if model is not None:  # after the import, so a mistyped task leaves no store behind
            service.configure(base_model=model)
        if task_adapter is not None or collab is not None or blend is not None:
            service.configure(task_adapter=task_adapter, collab=collab, blend=blend)
        if label_fit is not None:
            service.configure(label_fit=label_fit)
    payload = {**asdict(result), "store": service.location}

    def render(p: dict) -> None:
        console.out.print(
            f"{p['task']}: {len(p['users']):,} users ({p['new_users']:,} new), "
            f"{p['items_added']:,} history items added to {p['store']}",
            highlight=False,
        )
        if p["forgotten"]:
            console.out.print(
                f"left out {len(p['forgotten']):,} forgotten user(s) "
                f"({', '.join(map(repr, p['forgotten'][:5]))}); `tailorlm users add ID` creates one again",
                highlight=False,
            )

    console.emit(payload, as_json, render)


@users_app.command("list")
def list_command(store: str | None = STORE_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Every user: module kind, current version, history size, whether their module is out of date."""
    with user_errors(*STORE_ERRORS):
        service = _service(store)
        infos = service.list_users()
        payload = {"store": service.location, "settings": asdict(service.settings())}
    payload["users"] = [_summary(info) for info in infos]

    def render(p: dict) -> None:
        rows = [
            (u["user"], u["kind"], u["version"], u["versions"], u["history"], u["keys"], u["status"])
            for u in p["users"]
        ]
        columns = ["user", "kind", "version", "versions", "history", "keys", "status"]
        console.out.print(console.table(f"{len(rows):,} users in {p['store']}", columns, rows))

    console.emit(payload, as_json, render)


def _summary(info: UserInfo) -> dict:
    return {
        "user": info.user_id,
        "kind": info.kind,
        "version": info.current_version,
        "versions": len(info.versions),
        "history": info.history,
        "keys": info.keys,
        "data_changed": info.data_changed,
        "status": info.needs_training or "up to date",
    }


@users_app.command("show")
def show_command(
    user: str = typer.Argument(..., help="The user's id."),
    store: str | None = STORE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """One user: spec, every stored version (size, sha256, data fingerprint, losses), history, keys."""
    with user_errors(*STORE_ERRORS):
        info = _service(store).show(user)
    console.emit(info.to_dict(), as_json, _render_user)


def _render_user(p: dict) -> None:
    say = console.out.print
    say(f"[bold]{p['user_id']}[/]  {p['kind']} {p['spec']}", highlight=False)
    say(f"history: {p['history']:,} items, fingerprint {p['data_fingerprint'][:16]}", highlight=False)
    say(f"status: {p['needs_training'] or 'up to date'}   keys: {p['keys']}", highlight=False)
    rows = [
        (
            ("* " if v["version"] == p["current_version"] else "  ") + str(v["version"]),
            v["kind"],
            _when(v["created"]),
            f"{v['size']:,}",
            v["sha256"][:16],
            (v["data_fingerprint"] or "-")[:16],
            ", ".join(f"{x:.3f}" for x in v["metrics"].get("val_losses", [])) or "-",
        )
        for v in p["versions"]
    ]
    columns = ["version", "kind", "created", "bytes", "sha256", "data", "val losses"]
    say(console.table("versions (* current)", columns, rows))


@users_app.command("train")
def train_command(
    users: list[str] | None = typer.Argument(None, help="Users to train (default: every user)."),
    every: bool = typer.Option(
        False, "--all", help="Retrain even users whose module is up to date with their history."
    ),
    from_current: bool = typer.Option(
        False, "--from-current", help="Continue from each user's current module instead of a fresh one."
    ),
    epochs: int = typer.Option(MethodSettings.epochs, "--epochs", min=1, help="Epochs per user."),
    users_per_step: int = typer.Option(
        MethodSettings.users_per_step, "--users-per-step", min=1, help="Users trained together per step."
    ),
    model: str | None = MODEL_OPTION,
    device: str | None = DEVICE_OPTION,
    dtype: str | None = DTYPE_OPTION,
    backend: str = BACKEND_OPTION,
    workers: int | None = WORKERS_OPTION,
    group_users: int | None = GROUP_USERS_OPTION,
    ray_address: str | None = RAY_ADDRESS_OPTION,
    store: str | None = STORE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Train users whose module is missing or out of date, many per step; a killed run resumes."""
    reporter = console.ConsoleReporter(visible=not as_json)
    method_settings = replace(MethodSettings(), epochs=epochs, users_per_step=users_per_step)
    with (
        user_errors(
            *STORE_ERRORS, ModuleFileError, models.ModelNotFoundError, DeviceError, EngineError, ClusterError
        ),
        runner_for(backend, group_users, workers, ray_address) as runner,
    ):
        service = _service(store, method_settings=method_settings, device=device, dtype=dtype, runner=runner)
        if model is not None:
            service.configure(base_model=model)

        def stored(record: VersionRecord) -> None:
            reporter.log(f"stored {record.user_id!r} version {record.version}")

        outcome = service.train(
            users or None,
            changed_only=not every,
            on_progress=reporter.progress("training users"),
            on_user=stored,
            start_from_current=from_current,
        )
    payload = {"store": service.location, **asdict(outcome)}

    def render(p: dict) -> None:
        console.out.print(f"trained {len(p['trained']):,} users", highlight=False)
        for user, why in p["skipped"].items():
            console.out.print(f"  skipped {user}: {why}", highlight=False)

    console.emit(payload, as_json, render)


@users_app.command("rollback")
def rollback_command(
    user: str = typer.Argument(..., help="The user's id."),
    version: int | None = typer.Option(
        None, "--version", help="Version to serve (default: the one before the current)."
    ),
    store: str | None = STORE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Serve an earlier stored version of a user's module again."""
    with user_errors(*STORE_ERRORS):
        record = _service(store).rollback(user, version)
    console.emit(
        {"user": record.user_id, "version": record.version, "sha256": record.sha256},
        as_json,
        lambda p: console.out.print(f"user {p['user']!r} now serves version {p['version']}", highlight=False),
    )


COMPACTION_WAIT = 10.0  # seconds ``users delete`` retries a compaction a reader held up


@users_app.command("delete")
def delete_command(
    user: str = typer.Argument(..., help="The user's id."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    store: str | None = STORE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Forget a user: every module version, their history, keys and caches, overwritten in the index."""
    with user_errors(*STORE_ERRORS):
        service = _service(store)
        service.show(user)  # an unknown user is an error before anything is asked
        if not yes:
            typer.confirm(f"forget user {user!r} and everything stored about them?", abort=True, err=True)
        forgotten = service.delete(user)
        if not forgotten.compacted:  # a one-off command: give a reader a few seconds to finish
            forgotten = service.await_compaction(forgotten, COMPACTION_WAIT)

    def render(p: dict) -> None:
        console.out.print(
            f"forgot user {p['user_id']!r}: {len(p['versions'])} module versions, {p['history']:,} history "
            f"items, {p['keys']} keys" + (", cached data" if p["cache"] else ""),
            highlight=False,
        )
        if not p["compacted"]:
            console.out.print(
                f"the index is not compacted yet: {p['compaction']}; the next process to open the store "
                "retries (`tailorlm users show ID` says when it is done)",
                highlight=False,
            )

    console.emit(asdict(forgotten), as_json, render)


@key_app.command("issue")
def key_issue_command(
    user: str | None = typer.Argument(None, help="The user the key acts for (omit with --admin)."),
    admin: bool = typer.Option(False, "--admin", help="An admin key: manages every user."),
    label: str | None = typer.Option(None, "--label", help="A note kept with the key's hash."),
    store: str | None = STORE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Issue an API key. It is printed this once; the store keeps only its hash."""
    with user_errors(*STORE_ERRORS):
        if admin == (user is not None):
            raise UserError("give a user id for a user key, or --admin (and no user) for an admin key")
        key = _service(store).issue_key(user, admin=admin, label=label)
    payload = {"user": user, "role": "admin" if admin else "user", "key": key}

    def render(p: dict) -> None:
        console.err.print("the key is shown this once; keep it now:", highlight=False)
        console.out.print(p["key"], highlight=False)

    console.emit(payload, as_json, render)


@key_app.command("revoke")
def key_revoke_command(
    user: str | None = typer.Argument(None, help="Revoke every key of this user."),
    key: str | None = typer.Option(None, "--key", help="Revoke this one key instead."),
    admin: bool = typer.Option(False, "--admin", help="Revoke every admin key instead."),
    store: str | None = STORE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Revoke API keys: all of a user's, one key, or every admin key."""
    with user_errors(*STORE_ERRORS):
        if sum((user is not None, key is not None, admin)) != 1:
            raise UserError("give exactly one of: a user id, --key KEY, --admin")
        service = _service(store)
        if key is not None:
            if not service.revoke_key(key):
                raise UserError("no such key (already revoked, or mistyped)")
            revoked = 1
        elif admin:
            revoked = service.revoke_admin_keys()
        else:
            revoked = service.revoke_keys(user)
    console.emit({"revoked": revoked}, as_json, lambda p: console.out.print(f"revoked {p['revoked']} key(s)"))
