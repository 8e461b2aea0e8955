"""Fixtures for the benchmark tests: the planted run folder and its results."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_helpers import planted_run

from tailorlm.bench.results import write_results


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(run folder, results) of ``planted_run``, built once per test module."""
    root = planted_run(tmp_path_factory.mktemp("planted") / "run")
    return root, write_results(root)
