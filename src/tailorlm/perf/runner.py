"""The sections of ``tailorlm perf engine`` in the order they run, and the run itself: each section
measured with its machine readings (peak RSS, load, CPU use), everything in one JSON-ready payload."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, replace

import torch

from tailorlm import kinds, settings
from tailorlm.perf.decode import bench_decode, bench_decode_single
from tailorlm.perf.gemm import bench_gemm
from tailorlm.perf.harness import Bench, MachineWatch, PeakRSS, PerfConfig, Section, run_dtypes
from tailorlm.perf.load import bench_load
from tailorlm.perf.memory import bench_memory
from tailorlm.perf.mixed import bench_mixed
from tailorlm.perf.precision import precision_section
from tailorlm.perf.size import bench_bytes
from tailorlm.perf.train import bench_train, bench_train_task


def _mixed(kind: str) -> Callable[[Bench], Section]:
    return lambda bench: bench_mixed(bench, kind)


# A mixed-batch section per registered kind, then one section per question. The GEMM peak runs before
# the training sections, which report their useful FLOP/s against it.
RUNNERS: dict[str, Callable[[Bench], Section]] = {
    **{kind: _mixed(kind) for kind in kinds.MODEL_KINDS},
    "decode": bench_decode,
    "decode-single": bench_decode_single,
    "gemm": bench_gemm,
    "train": bench_train,
    "train-task": bench_train_task,
    "memory": bench_memory,
    "load": bench_load,
    "bytes": bench_bytes,
}
SECTIONS: tuple[str, ...] = tuple(RUNNERS)
# Sections that measure every dtype of the run themselves, or whose figures do not depend on the base's
# dtype (users' modules are fp32 in any engine, files fp16 at rest): run once. Every other section runs
# once per dtype of the run (fp32 and bf16 by default), each with its own base in that dtype.
ONCE = frozenset({"gemm", "decode-single", "load", "bytes"})


def parse_sections(values: Iterable[str] | None) -> list[str]:
    """``--only`` values (repeated and/or comma separated) in the benchmark's order; all when empty."""
    wanted = {part.strip().lower() for value in values or () for part in value.split(",") if part.strip()}
    unknown = wanted - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return [name for name in SECTIONS if name in wanted] if wanted else list(SECTIONS)


def run_section(bench: Bench, name: str, threads: int, per_dtype: bool = False) -> Section:
    """One section with its peak RSS and what the machine did meanwhile in ``facts``; ``per_dtype``: it
    is one of several runs of the section, marked with its bench's dtype."""
    label = f"{name} ({bench.dtype_name})" if per_dtype else name
    bench.log(f"section {label}")
    with PeakRSS() as memory, MachineWatch(threads) as machine:
        section = RUNNERS[name](bench)
    if per_dtype:
        section.dtype = bench.dtype_name
        section.title = f"[{bench.dtype_name}] {section.title}"
    section.facts.update(machine.facts)
    section.facts.update(memory.to_dict())
    return section


def run_benchmark(
    config: PerfConfig, sections: Sequence[str] = SECTIONS, log: Callable[[str], None] | None = None
) -> dict:
    """Run the chosen sections and return every figure as one JSON-ready payload."""
    threads = settings.apply_threads()
    started = time.perf_counter()
    dtypes = run_dtypes(config)
    with PeakRSS() as whole:
        shared: dict = {}
        benches = [Bench(replace(config, dtype=dtype), log, dtypes, shared) for dtype in dtypes]
        bench = benches[0]
        results = []
        for name in sections:
            for each in [bench] if name in ONCE else benches:
                results.append(
                    run_section(each, name, threads, per_dtype=name not in ONCE and len(dtypes) > 1)
                )
                # The section's engines and models die with its frame; collect them before the next loads.
                gc.collect()
        results.append(precision_section(config, bench, results))
    checks = [check for section in results for check in section.checks]
    return {
        "benchmark": "engine",
        "model": bench.bare.name,
        "device": str(bench.bare.device),
        "dtypes": list(dtypes),
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
