"""Fixtures for the perf tests: a small tiny-model config and a ``Bench`` on it, shared per test module."""

from __future__ import annotations

import pytest

from tailorlm.perf.harness import Bench, PerfConfig

SMALL = PerfConfig(
    model="tiny",
    resident=20,
    users_per_batch=4,
    repeats=1,
    tokens=48,
    decode_tokens=4,
    train_examples=2,
    train_batch=2,
    train_repeats=1,
    gemm_rows=(16, 64),
    gemm_min_seconds=0.002,
    memory_long_tokens=96,
    load_samples=3,
    stores=(3, 12),
)


@pytest.fixture(scope="module")
def small() -> PerfConfig:
    return SMALL


@pytest.fixture(scope="module")
def bench(small: PerfConfig) -> Bench:
    return Bench(small)
