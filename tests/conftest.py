"""Shared fixtures: the tiny same-tokenizer model for fast tests, the real model for marked ones, and
engines over every registered module kind."""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tailorlm import models, settings

# Helpers shared by tests/kinds, engine, store and train live in tests/ itself (kind_helpers.py). pytest's
# default "prepend" import mode already puts this file's folder on sys.path when it imports this
# conftest; saying so explicitly keeps `import kind_helpers` working under --import-mode=importlib too,
# without __init__.py files (which would change every test module's import name) or pyproject settings.
_TESTS = str(Path(__file__).parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

# The suite's tolerances are fp32's (bf16 has its own tests, which ask for it), and a test must not depend
# on this machine's measured choice nor on a measurement cached by an earlier run: every model a test
# loads without naming a dtype is fp32. tests/test_precision.py measures ``auto`` in a temporary folder.
os.environ[settings.DTYPE_ENV] = "fp32"


def pytest_configure(config: pytest.Config) -> None:
    # Each xdist worker takes its share of the cores; two workers at 2 threads each ran 3.5x slower here.
    settings.apply_threads()


@pytest.fixture(scope="session")
def tokenizer():
    return models.load_tokenizer()


@pytest.fixture(scope="session")
def tiny(tokenizer) -> models.BaseModel:
    """The tiny base, shared by the whole session: never wrap or change it (use ``make_base``)."""
    return models.tiny_model(seed=0, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def real_base() -> models.BaseModel:
    return models.load_base()


@pytest.fixture
def make_base(tiny) -> Callable[[], models.BaseModel]:
    """A fresh copy of ``tiny`` per call, for anything that changes its base in place (an engine wraps its
    projections, PEFT injects its layers, a merge rewrites weights). A deep copy is bit-identical to
    ``models.tiny_model(seed=0)`` and ten times faster to make."""

    def build(dtype: str = "fp32") -> models.BaseModel:
        """``dtype``: what the copy computes in (``device.DTYPES``); the weights are ``tiny``'s, rounded."""
        from tailorlm.device import DTYPES

        model = copy.deepcopy(tiny.model).to(DTYPES[dtype])
        return models.BaseModel(model=model, tokenizer=tiny.tokenizer, name=tiny.name, path=None)

    return build


@pytest.fixture
def make_engine(make_base):
    """An engine of a registered kind, at the kind's default spec, on a fresh tiny base."""
    # Imported here, not at the top: the data and CLI tests share this conftest and need no torch.
    from tailorlm import kinds
    from tailorlm.engine.engine import Engine

    def build(kind: str, slots: int = 5, dtype: str = "fp32", **engine_options) -> Engine:
        return Engine(make_base(dtype), kinds.default_spec(kind), slots=slots, **engine_options)

    return build


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server of this test session (``postgres_server``): started on first use, stopped at
    the end. Skipped only when the server's binaries are missing and ``TAILORLM_REQUIRE_POSTGRES`` is
    unset (``make test`` sets it, so there a missing server fails)."""
    from postgres_server import REQUIRE_ENV, PostgresServer, binaries

    bin_dir = binaries()
    if bin_dir is None:
        reason = (
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb; apt-get install postgresql)"
        )
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{reason}, and {REQUIRE_ENV} is set")
        pytest.skip(reason)
    server = PostgresServer(bin_dir).start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def index_url(request) -> str | None:
    """Each test that takes this runs once per index backend: None (the store's own SQLite file, the
    default) or the URL of a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres").new_database()
