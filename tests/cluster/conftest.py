"""The Ray tests share one local instance (starting and stopping one takes about 10 s here): loopback
only, token auth off, 2 CPUs, shut down at the end of the session. They run in one xdist group, so they
share one worker's instance and two instances never run at once on the 2-core machine."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tailorlm.cluster.training import KILL_FILE_ENV

# The serving tests build their store as the server tests do (tests/serve/serve_helpers.py).
_SERVE_TESTS = str(Path(__file__).parents[1] / "serve")
if _SERVE_TESTS not in sys.path:
    sys.path.insert(0, _SERVE_TESTS)


@pytest.fixture(scope="session")
def ray_instance(tmp_path_factory):
    """A local Ray instance for the session; yields the folder where a test arms the worker-kill hook
    (``kill_file``): the workers inherit ``TAILORLM_TEST_KILL_FILE`` from this process when they start."""
    pytest.importorskip("ray")
    from tailorlm.cluster.session import connected

    hooks = tmp_path_factory.mktemp("hooks")
    os.environ[KILL_FILE_ENV] = str(hooks / "kill-a-worker")
    try:
        with connected(cpus=2) as ray:
            yield hooks
            assert ray.is_initialized()
    finally:
        os.environ.pop(KILL_FILE_ENV, None)
