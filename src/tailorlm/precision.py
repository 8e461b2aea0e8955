"""``--dtype auto``: which arithmetic is fastest on this machine, per phase, measured at the model's own
shapes rather than guessed.

Two phases, two shapes (``hidden`` and ``intermediate`` are the model's widths):

- ``batched`` (prefill, training, scoring): one MLP pair of many rows, ``x [512, hidden] @ W.T [hidden,
  intermediate]`` then ``[512, intermediate] @ W.T [intermediate, hidden]``, in fp32 and bf16;
- ``decode`` (small-batch decoding): the same pair for one row (a GEMV, memory-bound), in fp32, bf16 and
  int8 weight-only (PyTorch's dynamic int8 quantization of ``nn.Linear``, VNNI on x86; CPU only).

On an AVX512-BF16 CPU the batched pair runs several times faster in bf16, while one row is slower in bf16
than in fp32 and fastest with int8 weights (docs/engine.md, "Precision"). The measurement takes a few
tenths of a second and is cached in ``settings.precision_dir()``, one file per machine key (CPU model and
flags or GPU name, torch version, threads, device) and shapes, so it runs once per machine and model.

The engine itself runs the batched choice or the faster of fp32 and bf16 for decoding: int8 dynamic
quantization scales each input tensor by its largest value, so a row's result would depend on the other
rows of its batch (the mixed-batch contract), and it has no backward pass. Its figure is reported so the
gain it would bring to single-stream decoding stays visible.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tailorlm import settings
from tailorlm.device import AUTO, DTYPES, DeviceError
from tailorlm.files import atomic_write_text

BATCHED = "batched"
DECODE = "decode"
PHASES = (BATCHED, DECODE)
INT8 = "int8"  # weight-only int8 (dynamic activation quantization), decoding on the CPU only
BATCHED_ROWS = 512
DECODE_ROWS = 1
_ROUNDS = 5  # timed batches per candidate, interleaved; the fastest is kept
_BATCH_SECONDS = 0.005  # one timed batch repeats the pair at least this long
_FORMAT = 2  # bump when what is measured changes, so old cache files are not read


@dataclass(frozen=True)
class Choice:
    """What ``auto`` picked for one phase, and the measured microseconds per MLP pair it picked from
    (the fastest of interleaved rounds)."""

    phase: str
    dtype: str  # what the engine runs: fp32 or bf16
    fastest: str  # the fastest measured, int8 included
    micros: dict[str, float]  # candidate -> microseconds of one pair (fastest round)
    rows: int

    @property
    def reason(self) -> str:
        figures = ", ".join(f"{name} {value:.0f} us" for name, value in self.micros.items())
        rows = f"{self.rows} row{'' if self.rows == 1 else 's'}"
        text = f"{self.phase} ({rows} through one MLP pair): {figures} -> {self.dtype}"
        if self.fastest != self.dtype:
            text += (
                f" ({self.fastest} is faster but not exact in mixed batches, so the engine does not use it)"
            )
        return text


@dataclass(frozen=True)
class Measurement:
    key: dict[str, object]
    choices: dict[str, Choice]

    def choice(self, phase: str) -> Choice:
        if phase not in self.choices:
            raise DeviceError(f"unknown phase {phase!r}; use one of {', '.join(PHASES)}")
        return self.choices[phase]

    def to_dict(self) -> dict:
        return {"key": self.key, "choices": {phase: asdict(c) for phase, c in self.choices.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> Measurement:
        return cls(data["key"], {phase: Choice(**c) for phase, c in data["choices"].items()})


def cpu_description() -> dict[str, object]:
    """The CPU's model name and the flags that decide fast arithmetic (bf16, VNNI, AMX, AVX512)."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name":
                model = value.strip()
            elif name.strip() == "flags":
                flags = sorted(f for f in value.split() if f.startswith(("avx512", "amx", "avx_vnni", "fma")))
                break
    except OSError:
        pass
    return {"cpu": model, "flags": flags}


def machine_key(device: torch.device, hidden: int, intermediate: int) -> dict[str, object]:
    """Everything a measurement depends on: a change in any of it measures again."""
    key: dict[str, object] = {
        "format": _FORMAT,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "hidden": hidden,
        "intermediate": intermediate,
    }
    if device.type == "cuda":
        key["gpu"] = torch.cuda.get_device_name(device)
    else:
        key.update(cpu_description())
    return key


def _cache_file(folder: Path, key: dict[str, object]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return folder / f"{digest}.json"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _calls_lasting(run: Callable[[], object], device: torch.device) -> int:
    """Calls of ``run`` that last about ``_BATCH_SECONDS`` (doubling from one, after a warm call)."""
    run()
    calls = 1
    while calls < 4096:
        if _batch_micros(run, calls, device) * calls >= _BATCH_SECONDS * 1e6:
            break
        calls *= 2
    return calls


def _batch_micros(run: Callable[[], object], calls: int, device: torch.device) -> float:
    """Microseconds per call over ``calls`` calls."""
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(calls):
        run()
    _synchronize(device)
    return (time.perf_counter() - started) / calls * 1e6


def _fastest_micros(runs: dict[str, Callable[[], object]], device: torch.device) -> dict[str, float]:
    """Microseconds per call of each candidate: ``_ROUNDS`` rounds, each timing every candidate in turn
    (interleaved, so a slow spell of a shared machine falls on all of them), and the fastest round kept:
    another process can only slow a kernel down, so the minimum is the least disturbed figure."""
    calls = {name: _calls_lasting(run, device) for name, run in runs.items()}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(_ROUNDS):
        for name, run in runs.items():
            best[name] = min(best[name], _batch_micros(run, calls[name], device))
    return best


def mlp_pair(hidden: int, intermediate: int, device: torch.device, dtype: str) -> torch.nn.Module:
    """``hidden -> intermediate -> hidden`` without bias, as a decoder layer's projections are; ``int8``:
    the fp32 pair through ``quantize_dynamic``. Seeded, so every candidate multiplies the same numbers."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        pair = torch.nn.Sequential(
            torch.nn.Linear(hidden, intermediate, bias=False),
            torch.nn.Linear(intermediate, hidden, bias=False),
        ).eval()
    if dtype == INT8:
        with warnings.catch_warnings():  # torch.ao.quantization's deprecation notice; it still works
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(pair, {torch.nn.Linear}, dtype=torch.qint8)
    return pair.to(device=device, dtype=DTYPES[dtype])


def candidates(device: torch.device, phase: str) -> list[str]:
    """What a phase may run in here: fp32 and bf16 (where the device has bf16), int8 for decoding on the
    CPU (dynamic quantization has no GPU kernels)."""
    names = ["fp32"]
    if device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        names.append("bf16")
    if phase == DECODE and device.type == "cpu":
        names.append(INT8)
    return names


def measure(device: torch.device, hidden: int, intermediate: int) -> Measurement:
    """Time every candidate of every phase at the model's widths (a few tenths of a second here)."""
    choices = {}
    for phase, rows in ((BATCHED, BATCHED_ROWS), (DECODE, DECODE_ROWS)):
        runs = {}
        for name in candidates(device, phase):
            pair = mlp_pair(hidden, intermediate, device, name)
            activation = DTYPES["fp32" if name == INT8 else name]
            x = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(1))
            runs[name] = _inference(pair, x.to(device=device, dtype=activation))
        micros = _fastest_micros(runs, device)
        exact = {name: value for name, value in micros.items() if name != INT8}
        choices[phase] = Choice(
            phase=phase,
            dtype=min(exact, key=exact.__getitem__),
            fastest=min(micros, key=micros.__getitem__),
            micros=micros,
            rows=rows,
        )
    return Measurement(machine_key(device, hidden, intermediate), choices)


def _inference(pair: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return pair(x)

    return run


def measured(
    device: torch.device, hidden: int, intermediate: int, folder: Path | None = None
) -> tuple[Measurement, bool]:
    """This machine's measurement at these widths, from the cache when there is one (and True), else
    measured now and cached (and False). An unreadable cache file is measured again and replaced."""
    folder = folder or settings.precision_dir()
    key = machine_key(device, hidden, intermediate)
    path = _cache_file(folder, key)
    try:
        cached = Measurement.from_dict(json.loads(path.read_text()))
        if cached.key == key:
            return cached, True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    result = measure(device, hidden, intermediate)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(result.to_dict(), indent=2))
    except OSError:
        pass  # a read-only cache folder costs a measurement per run, nothing else
    return result, False


def model_widths(config: object) -> tuple[int, int]:
    """(hidden, intermediate) of a transformers config; intermediate defaults to 4 x hidden."""
    hidden = int(config.hidden_size)
    return hidden, int(getattr(config, "intermediate_size", None) or 4 * hidden)


def choose(config: object, device: torch.device, phase: str = BATCHED, folder: Path | None = None) -> Choice:
    """``auto``'s choice for a model of ``config`` on ``device`` in ``phase``."""
    hidden, intermediate = model_widths(config)
    return measured(device, hidden, intermediate, folder)[0].choice(phase)


def is_auto(name: str | None) -> bool:
    """Whether a ``--dtype`` value (None: ``settings.default_dtype()``) asks for the measured choice."""
    return (name or settings.default_dtype()).strip().lower() == AUTO
