"""The Ray tests share one local instance per test module (starting one takes seconds): loopback only,
token auth off, 2 CPUs, shut down after the module. They run in one xdist group, so two instances never
start at once on the 2-core machine."""

from __future__ import annotations

import os

import pytest

from tailorlm.cluster.training import KILL_FILE_ENV


@pytest.fixture(scope="module")
def ray_instance(tmp_path_factory):
    """A local Ray instance for the module; yields the folder where a test arms the worker-kill hook
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
