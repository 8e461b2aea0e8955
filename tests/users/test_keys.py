"""API keys: shown once, stored as a hash, resolved to their owner, refused when revoked or malformed."""

from __future__ import annotations

import pytest

from tailorlm.store.index import StoreIndex
from tailorlm.users import keys
from tailorlm.users.errors import UserError
from tailorlm.users.keys import KeyOwner, issue_key, key_hash, new_key, resolve_key


@pytest.fixture
def index(tmp_path):
    opened = StoreIndex(tmp_path / "index.sqlite3")
    opened.add_user("ann")
    opened.add_user("bob")
    yield opened
    opened.close()


def test_new_keys_carry_their_role_and_are_never_repeated():
    made = {new_key("user") for _ in range(50)}
    assert len(made) == 50
    assert all(k.startswith("tlm-u-") and len(k) == 6 + 43 for k in made)
    assert new_key("admin").startswith("tlm-a-")
    with pytest.raises(UserError, match="unknown key role"):
        new_key("root")


def test_keys_resolve_to_their_owner_and_only_the_hash_is_stored(index, tmp_path):
    ann = issue_key(index, "ann", label="laptop")
    admin = issue_key(index, None, "admin")
    assert resolve_key(index, ann) == KeyOwner("ann", "user")
    assert resolve_key(index, admin) == KeyOwner(None, "admin")
    assert [k.label for k in index.keys_of("ann")] == ["laptop"]
    assert index.keys_of("ann")[0].key_hash == key_hash(ann)
    index.checkpoint()
    for path in tmp_path.glob("index.sqlite3*"):
        data = path.read_bytes()
        assert ann.encode() not in data and admin.encode() not in data, path.name


@pytest.mark.parametrize(
    "presented",
    [None, "", " ", "tlm-u-", "x" * 100_000, "tlm-u-ünïcode", "\udc80", "\x00", b"tlm-u-bytes", 42, ["k"]],
)
def test_garbage_is_no_key_and_never_an_error(index, presented):
    issue_key(index, "ann")
    assert resolve_key(index, presented) is None


def test_a_near_miss_is_no_key(index):
    key = issue_key(index, "ann")
    assert resolve_key(index, key[:-1]) is None
    assert resolve_key(index, key + " ") is None
    assert resolve_key(index, key.upper()) is None
    assert resolve_key(index, key_hash(key)) is None  # the stored hash is not a key either


def test_the_hashes_are_confirmed_in_constant_time(index, monkeypatch):
    key = issue_key(index, "ann")
    compared = []

    def refuse(a, b):
        compared.append((a, b))
        return False

    monkeypatch.setattr(keys.hmac, "compare_digest", refuse)
    assert resolve_key(index, key) is None  # the lookup alone does not accept a key
    assert compared == [(key_hash(key), key_hash(key))]


def test_revoking_one_key_all_of_a_user_or_the_admins(index):
    first, second = issue_key(index, "ann"), issue_key(index, "ann")
    bob = issue_key(index, "bob")
    admin = issue_key(index, None, "admin")
    assert keys.revoke_key(index, first) is True
    assert keys.revoke_key(index, first) is False and keys.revoke_key(index, "\udc80") is False
    assert resolve_key(index, first) is None and resolve_key(index, second) == KeyOwner("ann", "user")
    assert keys.revoke_user_keys(index, "ann") == 1
    assert resolve_key(index, second) is None
    assert resolve_key(index, bob) == KeyOwner("bob", "user")
    assert resolve_key(index, admin) is not None
    assert keys.revoke_admin_keys(index) == 1
    assert resolve_key(index, admin) is None and resolve_key(index, bob) is not None


@pytest.mark.parametrize(
    ("user", "role", "message"),
    [
        ("nobody", "user", "no user 'nobody'"),
        (None, "user", "no user None"),
        ("ann", "admin", "belongs to no user"),
        ("ann", "owner", "unknown key role"),
    ],
)
def test_keys_are_issued_only_to_someone_who_exists(index, user, role, message):
    with pytest.raises(UserError, match=message):
        issue_key(index, user, role)
    assert index.keys_of("ann") == [] and index.keys_of(None) == []
