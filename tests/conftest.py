"""Shared fixtures: the tiny same-tokenizer model for fast tests, the real model for marked ones."""

from __future__ import annotations

import pytest

from tailorlm import models, settings


def pytest_configure(config: pytest.Config) -> None:
    # Each xdist worker takes its share of the cores; two workers at 2 threads each ran 3.5x slower here.
    settings.apply_threads()


@pytest.fixture(scope="session")
def tokenizer():
    return models.load_tokenizer()


@pytest.fixture(scope="session")
def tiny(tokenizer) -> models.BaseModel:
    return models.tiny_model(seed=0, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def real_base() -> models.BaseModel:
    return models.load_base()
