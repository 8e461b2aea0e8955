"""Reaching Ray: importing it with a clear message when the extra is missing, and joining (or starting)
the instance a command runs on.

A command started without an address starts a private local instance on this machine's loopback, sized
by ``cpus``, with no dashboard; one with ``address`` joins a running cluster (``ray start --head`` on
one machine, ``ray start --address`` on the others). Either way the workers import this very copy of
tailorlm: its source folder goes first on their ``PYTHONPATH``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

INSTALL_HINT = "Ray is not installed: pip install tailorlm[ray]"
BACKENDS = ("local", "ray")


class ClusterError(RuntimeError):
    """Ray is missing or cannot be reached; the message is one line a person can act on."""


def import_ray() -> ModuleType:
    """The ``ray`` module, or a ClusterError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ClusterError(INSTALL_HINT) from None
    return ray


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ClusterError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def _source_path() -> str:
    """The folder holding the imported ``tailorlm`` package, first on the workers' import path."""
    here = str(Path(__file__).resolve().parents[2])  # src/tailorlm/cluster/session.py -> src
    inherited = [part for part in os.environ.get("PYTHONPATH", "").split(os.pathsep) if part and part != here]
    return os.pathsep.join([here, *inherited])


@contextlib.contextmanager
def connected(address: str | None = None, cpus: int | None = None) -> Iterator[ModuleType]:
    """Ray, joined for the block: an instance already joined by this process is used as it is (and left
    running); otherwise a new local one (``cpus`` logical CPUs, loopback, no dashboard, token auth off:
    nothing but this process can reach it) or the cluster at ``address``, shut down when the block ends."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    # A fresh local instance turns token auth on and writes ~/.ray/auth_token unless told otherwise.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    options: dict = {
        "include_dashboard": False,
        "runtime_env": {"env_vars": {"PYTHONPATH": _source_path()}},
        "logging_level": "WARNING",
        "log_to_driver": False,
    }
    if address is None:
        options.update(num_cpus=cpus, _node_ip_address="127.0.0.1")
    try:
        ray.init(address=address, **options)
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise ClusterError(f"cannot reach Ray{f' at {address}' if address else ''}: {error}") from None
    try:
        # Ray's driver prints its processes' messages (a killed actor's retries, say) on stdout: they go
        # to stderr instead, so a command's --json output stays one JSON object.
        with contextlib.redirect_stdout(sys.stderr):
            yield ray
    finally:
        ray.shutdown()
