"""Fixtures of the server tests: a module-wide store of users of every kind and a live server over it."""

from __future__ import annotations

import pytest
from serve_helpers import Users, build_store, fresh, serve_config

from tailorlm.serve.run import background


@pytest.fixture(scope="module")
def store_users(tmp_path_factory, tiny) -> Users:
    return build_store(tmp_path_factory.mktemp("store"), tiny)


@pytest.fixture(scope="module")
def live(store_users, tiny):
    """A server over ``store_users`` answering on 127.0.0.1 for the whole module."""
    with background(serve_config(store_users.root, retrain=False), base=fresh(tiny)) as server:
        yield server
