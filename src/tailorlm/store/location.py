"""How a store finds its index, so that every command and process given only the store's root (the CLI,
the server, the training workers it spawns, another machine) opens the same one.

- A store whose index is its own SQLite file (``root/index.sqlite3``, the default) needs nothing more.
- A store created with another index (``--index postgresql://...``, or ``TAILORLM_INDEX_URL``) records
  it in ``root/.store.json`` (``{"index": URL without password, "store_id": ...}``, hidden so no user
  folder can take its name). libpq finds the password in ``PGPASSWORD`` or ``~/.pgpass``; none is ever
  written to disk.
- ``TAILORLM_INDEX_URL`` (or an explicit index) overrides the recorded URL, for a machine that reaches
  the same database under another name.

Whichever URL is used, the index must be this store's: the store's id is in both the root's record and
the index's ``meta`` table, so a store opened with another store's index, an empty database, or the
SQLite file it does not use is one clear ``StoreLocationError``, never a silently empty store.
"""

from __future__ import annotations

import json
import os
import uuid

from tailorlm.store.index import INDEX_FILE, StoreIndex
from tailorlm.store.index_backends import StoreLocationError, is_postgres, without_password
from tailorlm.store.roots import Root

INDEX_ENV = "TAILORLM_INDEX_URL"
LOCATION_FILE = ".store.json"  # where a store with another index records it
STORE_META = "store"  # the index's meta row naming the store it belongs to: {"id": ..., "root": ...}


def recorded_index(root: Root) -> dict[str, str] | None:
    """The root's record of its index, {"index": URL, "store_id": ...}, or None."""
    text = root.read_text(LOCATION_FILE)
    if text is None:
        return None
    try:
        recorded = json.loads(text)
        return {"index": str(recorded["index"]), "store_id": str(recorded["store_id"])}
    except (ValueError, KeyError, TypeError):
        raise StoreLocationError(f"{root.describe(LOCATION_FILE)} is not a store's index record") from None


def exists(root: Root) -> bool:
    """Whether a store was created at ``root`` (its own index file, or the record of another)."""
    return root.is_file(INDEX_FILE) or root.is_file(LOCATION_FILE)


def open_index(root: Root, asked: str | None = None) -> StoreIndex:
    """The index of the store at ``root``: ``asked``, else ``TAILORLM_INDEX_URL``, else the one the root
    records, else the root's own SQLite file. A new store's index other than that file is claimed for the
    store and recorded in the root."""
    asked = asked or os.environ.get(INDEX_ENV) or None
    recorded = recorded_index(root)
    if asked is None and recorded is None:
        return StoreIndex(_own_file(root))
    if recorded is None and root.is_file(INDEX_FILE):
        raise StoreLocationError(
            f"the store at {root.location} has its index in {root.describe(INDEX_FILE)}, not at "
            f"{without_password(asked)}: open it without --index and with {INDEX_ENV} unset"
        )
    index = StoreIndex(asked or recorded["index"])
    try:
        if recorded is None:
            _claim(index, root, asked)
        else:
            _check(index, root, recorded)
    except BaseException:
        index.close()
        raise
    return index


def _own_file(root: Root) -> str:
    try:
        return str(root.local(INDEX_FILE))
    except StoreLocationError:
        raise StoreLocationError(
            f"a store at {root.location} keeps its index in PostgreSQL (or a SQLite file on this machine): "
            f"give --index postgresql://USER@HOST/DATABASE or set {INDEX_ENV}"
        ) from None


def _claim(index: StoreIndex, root: Root, asked: str) -> None:
    """Make ``index`` the new store's, unless it is another store's already, and record it in the root."""
    mine = {"id": uuid.uuid4().hex, "root": root.absolute}
    held = json.loads(index.claim_meta(STORE_META, json.dumps(mine, sort_keys=True)))
    if held["root"] != root.absolute:  # the same root created by another process at once is fine
        raise StoreLocationError(
            f"{index.where} is already the index of the store at {held['root']}; give the store at "
            f"{root.location} an index of its own"
        )
    url = without_password(asked) if is_postgres(asked) else str(index.path.resolve())
    root.write_text(LOCATION_FILE, json.dumps({"index": url, "store_id": held["id"]}, indent=2) + "\n")


def _check(index: StoreIndex, root: Root, recorded: dict[str, str]) -> None:
    held = index.meta(STORE_META)
    if held is None or json.loads(held)["id"] != recorded["store_id"]:
        whose = f"the store at {json.loads(held)['root']}" if held else "no store"
        raise StoreLocationError(
            f"{index.where} holds the index of {whose}, not of the store at {root.location} (created with "
            f"its index at {recorded['index']})"
        )
