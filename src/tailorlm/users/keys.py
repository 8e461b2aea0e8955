"""API keys: a random token per key, shown once; the store keeps only its sha256.

A key is ``tlm-u-`` (a user's) or ``tlm-a-`` (an admin's) followed by 32 random bytes, url-safe base64.
The prefix only makes keys recognisable in a config file or a leaked log; the role comes from the index,
never from the prefix. Keys have 256 bits of entropy, so a plain sha256 (no salt, no slow hash) is enough:
nothing can be guessed, and a lookup stays one indexed query.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from tailorlm.store.index import StoreIndex
from tailorlm.users.errors import UserError

ROLES = ("user", "admin")
PREFIXES = {"user": "tlm-u-", "admin": "tlm-a-"}
# Longer than any key this module makes (6 + 43 characters): a longer string is refused before hashing.
MAX_KEY_CHARS = 256


@dataclass(frozen=True)
class KeyOwner:
    """Whom a presented key belongs to: a user (``role`` "user") or an admin (``user_id`` None)."""

    user_id: str | None
    role: str


def new_key(role: str) -> str:
    """A fresh key for ``role``."""
    _check_role(role)
    return PREFIXES[role] + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    """What the index stores for ``key``: its sha256, hex."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def issue_key(index: StoreIndex, user_id: str | None, role: str = "user", label: str | None = None) -> str:
    """Record a new key and return it: the only time the key itself is seen. A user key needs an
    existing user; an admin key belongs to no user."""
    _check_role(role)
    if role == "admin" and user_id is not None:
        raise UserError("an admin key belongs to no user; issue it without a user id")
    if role == "user" and (user_id is None or not index.has_user(user_id)):
        raise UserError(f"no user {user_id!r} in this store: add or import them first")
    key = new_key(role)
    index.add_key(key_hash(key), user_id, role, label)
    return key


def resolve_key(index: StoreIndex, presented: object) -> KeyOwner | None:
    """Whom ``presented`` belongs to, or None for anything that is not a live key: absent, empty, too
    long, not ASCII, unknown or revoked. Never raises on what a client sends."""
    if not isinstance(presented, str) or not presented or len(presented) > MAX_KEY_CHARS:
        return None
    if not presented.isascii():  # every key is ASCII; this also keeps lone surrogates out of encode()
        return None
    digest = key_hash(presented)
    record = index.find_key(digest)
    # The index found the row by equality; comparing the hashes again in constant time keeps the
    # acceptance decision itself free of a timing side channel, whatever the database does.
    if record is None or not hmac.compare_digest(record.key_hash, digest):
        return None
    return KeyOwner(record.user_id, record.role)


def revoke_key(index: StoreIndex, key: str) -> bool:
    """Revoke one key, given the key itself; False when it is not a live key."""
    if not isinstance(key, str) or not key.isascii():
        return False
    return index.revoke_key(key_hash(key))


def revoke_user_keys(index: StoreIndex, user_id: str) -> int:
    """Revoke every key of ``user_id``; returns how many there were."""
    return index.revoke_keys(user_id)


def revoke_admin_keys(index: StoreIndex) -> int:
    """Revoke every admin key; returns how many there were."""
    return index.revoke_admin_keys()


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise UserError(f"unknown key role {role!r}; use one of {', '.join(ROLES)}")
