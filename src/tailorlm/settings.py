"""Where tailorlm keeps its files and how many CPU threads torch may use.

All are read from the environment so that one variable moves every cache (``TAILORLM_HOME``), one
variable caps the threads (``TAILORLM_THREADS``), one names the default user store (``TAILORLM_STORE``)
and one the compute precision used when ``--dtype`` is not given (``TAILORLM_DTYPE``, ``fp32`` unless set).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

HOME_ENV = "TAILORLM_HOME"
THREADS_ENV = "TAILORLM_THREADS"
STORE_ENV = "TAILORLM_STORE"
DTYPE_ENV = "TAILORLM_DTYPE"


def home() -> Path:
    """The root of every cache tailorlm writes (models, profiles, embeddings)."""
    configured = os.environ.get(HOME_ENV)
    root = Path(configured).expanduser() if configured else Path.home() / ".cache" / "tailorlm"
    return root


def models_dir() -> Path:
    return home() / "models"


def precision_dir() -> Path:
    """Where ``--dtype auto`` keeps its measurements of this machine (``tailorlm.precision``)."""
    return home() / "precision"


def asked_dtype() -> str | None:
    """The dtype ``TAILORLM_DTYPE`` asks for, lower-cased, or None when it is not set."""
    return os.environ.get(DTYPE_ENV, "").strip().lower() or None


def default_dtype() -> str:
    """The ``--dtype`` of a command that was given none: ``TAILORLM_DTYPE``, else ``fp32``. Not ``auto``
    yet: a bf16 base trained measurably worse on bfi (per-user LoRA +0.153 MAE, task adapter +0.083, each
    interval above 0; docs/engine.md), so the faster arithmetic is asked for, not assumed."""
    return asked_dtype() or "fp32"


def default_store() -> Path | str:
    """The user store the ``users`` commands and the server use unless told: ``TAILORLM_STORE`` (a folder,
    or an fsspec URL kept as it is), else ``stores/default`` in the working folder (beside ``runs/``;
    users' data is not a cache, so it does not go under ``home()``)."""
    configured = os.environ.get(STORE_ENV)
    if configured and "://" in configured:
        return configured
    return Path(configured).expanduser() if configured else Path("stores") / "default"


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _parallel_workers() -> int:
    # pytest-xdist announces how many workers share the machine; each must stay on its share of cores.
    try:
        return max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    except ValueError:
        return 1


def thread_count() -> int:
    """Torch intra-op threads: ``TAILORLM_THREADS`` if set, else the available cores split among
    parallel test workers. Oversubscribing 2 cores made a training step 3.5x slower here."""
    configured = os.environ.get(THREADS_ENV)
    if configured:
        try:
            value = int(configured)
        except ValueError as err:
            raise ValueError(f"{THREADS_ENV} must be a whole number of threads, got {configured!r}") from err
        if value < 1:
            raise ValueError(f"{THREADS_ENV} must be at least 1, got {value}")
        return value
    return max(1, available_cores() // _parallel_workers())


def apply_threads(count: int | None = None) -> int:
    """Set torch's thread pools once; returns the count in force."""
    import torch

    wanted = count or thread_count()
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    # The inter-op pool is fixed once any parallel work ran; the intra-op setting is what matters.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    return wanted
