"""The shared harness of ``tailorlm perf engine``: what a run measures (``PerfConfig``), how a figure is
kept (``Timing``, ``Check``, ``Section``), the timing loop, and what the machine did during a section
(peak RSS, load, CPU use). Each question is one file beside this one (``mixed``, ``decode``, ``gemm``,
``train``, ``memory``, ``load``, ``size``); ``runner`` lists them.

How a comparison stays honest:

- its contenders run the same rows (same token ids, padding and position ids);
- they run interleaved after a warm-up round, each round starting with the next contender (A, B, C, then
  B, C, A, then C, A, B): the machine is shared, and rotating spreads a slow spell over every contender
  instead of landing it on one; every figure is a median of rounds;
- one torch thread setting for the whole run (``settings.apply_threads``).

Peak RSS per section: ``ru_maxrss`` is a high-water mark of the whole process, so by itself it only
says what the worst section needed. On Linux the mark can be reset (``echo 5 > /proc/self/clear_refs``,
"reset the peak resident set size"), so each section resets it on entry and reads ``VmHWM`` on exit: the
kernel's own exact peak over the section, with no sampling gap, in the same process (a subprocess per
section would reload every model and hand the GEMM peak across a pipe). Where the reset is refused, a
background thread samples ``VmRSS`` every 10 ms instead (it can miss a spike shorter than that).

Every figure is measured when the benchmark runs; nothing here is a stored result.
"""

from __future__ import annotations

import os
import resource
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from tailorlm import models, precision, settings
from tailorlm.device import AUTO, DTYPES, check_dtype_name, resolve_device

TINY = models.TINY_MODEL

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_SAMPLE_SECONDS = 0.01


@dataclass(frozen=True)
class PerfConfig:
    """What to measure and how often. ``model`` is a base model name, or ``"tiny"`` for a smoke run."""

    model: str | None = None
    device: str | None = None  # tailorlm.device: auto (the GPU when present) by default
    dtype: str | None = None  # None/auto: every section in fp32 and bf16 (run_dtypes); else that dtype
    resident: int = 1000
    users_per_batch: int = 8
    repeats: int = 5
    warmup: int = 1
    tokens: int = 128  # prompt length of the longest row of a mixed batch
    decode_tokens: int = 32  # new tokens per row in the generation comparison
    train_examples: int = 8  # per user, in both training comparisons
    train_batch: int = 4  # rows of one user per step
    train_repeats: int = 3
    task: str = "verbagg"  # an offline task whose real training rows the train-task and memory sections use
    task_max_length: int = 384  # tokens per row, as the benchmark runs (BenchConfig.max_length)
    gemm_rows: tuple[int, ...] = (64, 512, 2048)  # rows (tokens) of the timed matmuls
    gemm_min_seconds: float = 0.05  # one timed run repeats a matmul at least this long
    memory_long_tokens: int = 384  # row length of the memory section's long-row probe (0: skip it)
    load_samples: int = 200
    stores: tuple[int, ...] = (10, 1000)
    bank_budget_bytes: int = 2 * 1024**3  # fp32 bank memory per kind; sets the resident count of big kinds
    seed: int = 0


@dataclass
class Timing:
    """One contender's wall-clock seconds per run; ``items`` is how many examples a run processes."""

    name: str
    seconds: list[float]
    resident: int | None = None
    items: int | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def rate(self) -> float | None:
        return self.items / self.median if self.items else None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "median_s": self.median,
            "min_s": min(self.seconds),
            "max_s": max(self.seconds),
            "runs": len(self.seconds),
            "seconds": self.seconds,
            "resident": self.resident,
            "items": self.items,
            "per_second": self.rate,
        }


@dataclass
class Check:
    """A measured figure against its target. For time ratios ``numerator`` and ``denominator`` name the
    timings whose medians give ``value`` (a speed ratio: the slower contender's time on top)."""

    label: str
    value: float
    target: float
    higher_is_better: bool = True
    numerator: str | None = None
    denominator: str | None = None
    unit: str = "x"

    @property
    def passed(self) -> bool:
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "value": self.value,
            "target": self.target,
            "direction": ">=" if self.higher_is_better else "<=",
            "passed": self.passed,
            "numerator": self.numerator,
            "denominator": self.denominator,
            "unit": self.unit,
        }


@dataclass
class FactTable:
    """A small table of measured facts printed under a section (bytes per kind, GEMM shapes, memory)."""

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"title": self.title, "columns": self.columns, "rows": self.rows}


@dataclass
class Section:
    name: str
    title: str
    dtype: str | None = None  # the base's dtype when the section ran in one (a run may hold several)
    timings: list[Timing] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    facts: dict = field(default_factory=dict)
    tables: list[FactTable] = field(default_factory=list)

    def timing(self, name: str) -> Timing:
        return next(t for t in self.timings if t.name == name)

    def ratio(
        self, label: str, numerator: str, denominator: str, target: float, higher_is_better: bool = True
    ) -> Check:
        """Add the check ``median(numerator) / median(denominator)`` against ``target``."""
        value = self.timing(numerator).median / self.timing(denominator).median
        check = Check(label, value, target, higher_is_better, numerator, denominator)
        self.checks.append(check)
        return check

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "title": self.title,
            "dtype": self.dtype,
            "timings": [t.to_dict() for t in self.timings],
            "checks": [c.to_dict() for c in self.checks],
            "notes": self.notes,
            "facts": self.facts,
            "tables": [t.to_dict() for t in self.tables],
        }


def perf_dtype(config: PerfConfig) -> str:
    """The dtype a perf run is about: the one asked for (``--dtype`` or ``TAILORLM_DTYPE``), else ``auto``,
    whatever the other commands default to: perf's job is to show the alternatives side by side."""
    return check_dtype_name(config.dtype or settings.asked_dtype() or AUTO)


def run_dtypes(config: PerfConfig) -> tuple[str, ...]:
    """The dtypes a run measures: the one asked for, or (``auto``, perf's default) every dtype ``auto``
    chooses between for batched work on the device (fp32 and bf16 where it has bf16), so the choice is
    shown side by side with its alternative."""
    wanted = perf_dtype(config)
    if wanted != AUTO:
        return (wanted,)
    return tuple(precision.candidates(resolve_device(config.device), precision.BATCHED))


class Bench:
    """Shared state of one run in one dtype (``config.dtype``): the config, the bare base model, fresh
    bases for engines, and figures one section leaves for a later one (``shared``, common to the run's
    benches of every dtype: the GEMM peaks the training sections compare with). ``dtypes``: every dtype
    of the run (the GEMM section measures each)."""

    def __init__(
        self,
        config: PerfConfig,
        log: Callable[[str], None] | None = None,
        dtypes: tuple[str, ...] | None = None,
        shared: dict[str, Any] | None = None,
    ) -> None:
        if config.resident < config.users_per_batch:
            raise ValueError(
                f"--resident ({config.resident}) must be at least --users-per-batch "
                f"({config.users_per_batch}): a mixed batch holds distinct resident users"
            )
        self.config = config
        self.log = log or (lambda _message: None)
        self.dtypes = dtypes or run_dtypes(config)
        self.shared: dict[str, Any] = {} if shared is None else shared
        self._tokenizer = models.load_tokenizer() if self.is_tiny else None
        self._bare: models.BaseModel | None = None

    @property
    def is_tiny(self) -> bool:
        return (self.config.model or "").lower() == TINY

    def fresh_base(self, dtype: str | None = None) -> models.BaseModel:
        """A newly loaded base (in ``dtype``, else the bench's): an engine or a PEFT model wraps its base
        in place, so each gets its own."""
        dtype = dtype or self.config.dtype
        if self.is_tiny:
            return models.tiny_model(
                seed=0, tokenizer=self._tokenizer, device=self.config.device, dtype=dtype
            )
        return models.load_base(self.config.model, device=self.config.device, dtype=dtype)

    @property
    def dtype_name(self) -> str:
        """The bench's dtype as ``--dtype`` names it (fp32, bf16, fp16)."""
        return next(name for name, value in DTYPES.items() if value == self.bare.dtype)

    @property
    def bare(self) -> models.BaseModel:
        """The unwrapped base model every section compares with (loaded once per run)."""
        if self._bare is None:
            self._bare = self.fresh_base()
        return self._bare

    @property
    def tokenizer(self):
        return self.bare.tokenizer

    def interleaved(self, label: str, contenders: dict[str, Callable[[], object]]) -> dict[str, list[float]]:
        """Seconds per run of each contender: warm-up rounds, then rounds of A, B, C, then B, C, A, ..."""
        for _ in range(self.config.warmup):
            for run in contenders.values():
                run()
        seconds: dict[str, list[float]] = {name: [] for name in contenders}
        for round_index in range(self.config.repeats):
            for name in rotation(list(contenders), round_index):
                seconds[name].append(timed(contenders[name]))
            summary = ", ".join(f"{n} {s[-1]:.3f}s" for n, s in seconds.items())
            self.log(f"{label}: round {round_index + 1}/{self.config.repeats}: {summary}")
        return seconds


def rotation(names: list[str], round_index: int) -> list[str]:
    """The order of one round: each round starts with the next contender (round 0: A, B, C; round 1:
    B, C, A; round 2: C, A, B), so each runs first, in the middle and last equally often, and a slow spell
    or a drift within rounds lands on each in turn."""
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


def timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


# ---- memory ---------------------------------------------------------------------------------------------


def status_kib(key: str, pid: int | None = None) -> int | None:
    """A ``/proc/<pid>/status`` figure in KiB (this process by default); None where there is none."""
    status = _STATUS if pid is None else Path(f"/proc/{pid}/status")
    try:
        for line in status.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Resident set size now."""
    kib = status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no /proc: the best there is


def high_water_bytes() -> int:
    """The kernel's peak RSS since the process started or the mark was last reset."""
    kib = status_kib("VmHWM")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_high_water() -> bool:
    """Reset the peak RSS mark to the current RSS; False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class PeakRSS:
    """Peak resident memory over a ``with`` block (see the module docstring for how and why).

    Blocks may nest (the memory section measures steps inside its own section): an inner block's reset
    would erase what an outer block had seen, so every open block takes the mark before a reset and the
    inner peak after it.
    """

    _open: ClassVar[list[PeakRSS]] = []  # blocks entered and not yet left, outermost first

    def __init__(self) -> None:
        self.start = self.peak = self.end = 0
        self.exact = False
        self._seen = 0
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    @property
    def method(self) -> str:
        if self.exact:
            return "kernel high-water mark (VmHWM), reset at the start of the block"
        return f"VmRSS sampled every {_SAMPLE_SECONDS * 1000:.0f} ms"

    @property
    def increase(self) -> int:
        """How far the peak rose above the RSS at the start of the block."""
        return max(0, self.peak - self.start)

    def __enter__(self) -> PeakRSS:
        mark = high_water_bytes()
        for outer in PeakRSS._open:
            outer._seen = max(outer._seen, mark)
        self.start = rss_bytes()
        self.exact = reset_high_water()
        self._seen = self.start
        if not self.exact:
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        PeakRSS._open.append(self)
        return self

    def _sample(self) -> None:
        while not self._stop.wait(_SAMPLE_SECONDS):
            self._seen = max(self._seen, rss_bytes())

    def __exit__(self, *exc_info: object) -> None:
        PeakRSS._open.remove(self)
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
        self.end = rss_bytes()
        self.peak = max(self._seen, self.end, high_water_bytes() if self.exact else 0)
        for outer in PeakRSS._open:
            outer._seen = max(outer._seen, self.peak)

    def to_dict(self) -> dict:
        mb = 2**20
        return {
            "rss_mb_start": self.start / mb,
            "rss_mb_peak": self.peak / mb,
            "rss_mb_end": self.end / mb,
            "rss_mb_peak_increase": self.increase / mb,
            "rss_method": self.method,
        }


# ---- the machine ----------------------------------------------------------------------------------------


class MachineWatch:
    """What else the machine did during a block: the 1-minute load average before and after, and how
    busy this process's torch threads were (CPU seconds / (wall seconds x threads)). Well below 1 means
    waiting: on other jobs, on memory, or on serial work."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.facts: dict[str, Any] = {}

    def __enter__(self) -> MachineWatch:
        self._load = os.getloadavg()[0]
        self._wall = time.perf_counter()
        self._cpu = time.process_time()
        return self

    def __exit__(self, *exc_info: object) -> None:
        wall = time.perf_counter() - self._wall
        cpu = time.process_time() - self._cpu
        self.facts = {
            "load_average_1min": [self._load, os.getloadavg()[0]],
            "section_seconds": wall,
            "cpu_busy": cpu / (wall * self.threads) if wall > 0 else None,
        }
