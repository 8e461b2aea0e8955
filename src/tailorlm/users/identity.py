"""Who a user is: the one rule a user id must follow, checked wherever a user is created (HTTP's
``POST /v1/users``, ``tailorlm users add``, every import), and where a user's derived data lives.

The rule (``check_user_id``): 1 to ``MAX_USER_ID`` characters, all printable (no control, format or
line-separator characters), no surrounding whitespace, no ``/`` or ``\\`` and not ``.`` or ``..``. The
last part is what makes every id reachable over HTTP, where a user is a path segment
(``/v1/users/{id}``): a ``/`` (even sent as ``%2F``) splits the segment, and clients resolve ``.`` and
``..`` away. Everything else (any case, any script, ``%``, ``?``, spaces inside) is allowed and stays
distinct: ids are compared as exact strings, and the store names folders by a hash of the id
(``store.store.folder_name``), so two ids never share a folder.
"""

from __future__ import annotations

from tailorlm.store.store import folder_name, legacy_folder_name
from tailorlm.users.errors import UserError

MAX_USER_ID = 128
ID_RULE = (
    f"a user id is 1 to {MAX_USER_ID} printable characters, without surrounding whitespace, "
    "without '/' or '\\', and not '.' or '..'"
)
# Per-user data the service derives and keeps (profiles): hidden, so no user's module folder
# (``store.folder_name`` never makes a hidden name) can be mistaken for it.
CACHE_FOLDER = ".cache"


def check_user_id(user_id: object) -> str:
    """``user_id`` if it follows the id rule (``ID_RULE``); else a ``UserError`` naming what is wrong
    and the rule."""
    if not isinstance(user_id, str) or not user_id:
        raise UserError(f"a user id must be a non-empty string ({ID_RULE})")
    if len(user_id) > MAX_USER_ID:
        raise UserError(f"user id has {len(user_id)} characters, more than {MAX_USER_ID} ({ID_RULE})")
    if not user_id.isprintable():
        raise UserError(f"user id {user_id!r} holds control or unprintable characters ({ID_RULE})")
    if user_id != user_id.strip():
        raise UserError(f"user id {user_id!r} starts or ends with whitespace ({ID_RULE})")
    if "/" in user_id or "\\" in user_id or user_id in (".", ".."):
        raise UserError(f"user id {user_id!r} cannot be a path segment of a URL ({ID_RULE})")
    return user_id


def cache_of(user_id: str) -> str:
    """A user's cache folder, relative to the store's root."""
    return f"{CACHE_FOLDER}/{folder_name(user_id)}"


def legacy_cache_of(user_id: str) -> str:
    """Where a store written before hashed folder names kept ``user_id``'s cache; it may be another
    user's (``store.store.legacy_folder_name``), so what is read there is checked to be theirs."""
    return f"{CACHE_FOLDER}/{legacy_folder_name(user_id)}"
