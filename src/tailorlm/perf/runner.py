"""The sections of ``tailorlm perf engine`` in the order they run, and the run itself: each section
measured with its machine readings (peak RSS, load, CPU use), everything in one JSON-ready payload."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict

import torch

from tailorlm import kinds, settings
from tailorlm.perf.decode import bench_decode
from tailorlm.perf.gemm import bench_gemm
from tailorlm.perf.harness import Bench, MachineWatch, PeakRSS, PerfConfig, Section
from tailorlm.perf.load import bench_load
from tailorlm.perf.memory import bench_memory
from tailorlm.perf.mixed import bench_mixed
from tailorlm.perf.size import bench_bytes
from tailorlm.perf.train import bench_train, bench_train_task


def _mixed(kind: str) -> Callable[[Bench], Section]:
    return lambda bench: bench_mixed(bench, kind)


# A mixed-batch section per registered kind, then one section per question. The GEMM peak runs before
# the training sections, which report their useful FLOP/s against it.
RUNNERS: dict[str, Callable[[Bench], Section]] = {
    **{kind: _mixed(kind) for kind in kinds.MODEL_KINDS},
    "decode": bench_decode,
    "gemm": bench_gemm,
    "train": bench_train,
    "train-task": bench_train_task,
    "memory": bench_memory,
    "load": bench_load,
    "bytes": bench_bytes,
}
SECTIONS: tuple[str, ...] = tuple(RUNNERS)


def parse_sections(values: Iterable[str] | None) -> list[str]:
    """``--only`` values (repeated and/or comma separated) in the benchmark's order; all when empty."""
    wanted = {part.strip().lower() for value in values or () for part in value.split(",") if part.strip()}
    unknown = wanted - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return [name for name in SECTIONS if name in wanted] if wanted else list(SECTIONS)


def run_section(bench: Bench, name: str, threads: int) -> Section:
    """One section with its peak RSS and what the machine did meanwhile in ``facts``."""
    bench.log(f"section {name}")
    with PeakRSS() as memory, MachineWatch(threads) as machine:
        section = RUNNERS[name](bench)
    section.facts.update(machine.facts)
    section.facts.update(memory.to_dict())
    return section


def run_benchmark(
    config: PerfConfig, sections: Sequence[str] = SECTIONS, log: Callable[[str], None] | None = None
) -> dict:
    """Run the chosen sections and return every figure as one JSON-ready payload."""
    threads = settings.apply_threads()
    started = time.perf_counter()
    with PeakRSS() as whole:
        bench = Bench(config, log)
        results = []
        for name in sections:
            results.append(run_section(bench, name, threads))
            # The section's engines and models die with its frame; collect them before the next one loads.
            gc.collect()
    checks = [check for section in results for check in section.checks]
    return {
        "benchmark": "engine",
        "model": bench.bare.name,
        "threads": threads,
        "cores": settings.available_cores(),
        "torch": torch.__version__,
        "config": asdict(config),
        "sections": [section.to_dict() for section in results],
        "passed": sum(check.passed for check in checks),
        "missed": sum(not check.passed for check in checks),
        "peak_rss_mb": whole.peak / 2**20,
        "rss_method": whole.method,
        "total_seconds": time.perf_counter() - started,
    }
