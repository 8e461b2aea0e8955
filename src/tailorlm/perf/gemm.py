"""How fast can this machine multiply matrices of the base model's shapes? ``torch.matmul`` in the model's
dtype on the configured threads, for every distinct projection shape of the base's decoder
(SmolLM2-135M: 576 -> 576 for q and o, 576 -> 192 for k and v, 576 -> 1536 for gate and up, 1536 -> 576
for down), at several row counts (a row is one token position), in both directions training runs them:

- forward, ``x [rows, in] @ W.T [in, out]`` (what ``nn.Linear`` does);
- backward to the activations, ``grad [rows, out] @ W [out, in]`` (a frozen base needs no weight grads).

Each takes 2 x rows x in x out FLOP, timed in every dtype of the run (fp32 and bf16 by default). The best
median GFLOP/s over these shapes and dtypes is the GEMM peak the training sections divide their useful
FLOP/s by (the best the machine offers, whichever dtype the contender ran in); the model mix (every
projection of one layer, both directions, weighted by how often the layer has it) says what a pass made
only of these GEMMs would reach.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tailorlm.device import DTYPES
from tailorlm.perf.harness import Bench, FactTable, Section

PEAK_KEY = "gemm_peak_gflops"


@dataclass(frozen=True)
class Gemm:
    rows: int
    inner: int  # the contracted dimension
    cols: int
    direction: str  # "forward" or "backward"
    count: int  # how many projections of the decoder have this shape (per direction)

    @property
    def flop(self) -> int:
        return 2 * self.rows * self.inner * self.cols

    @property
    def label(self) -> str:
        return f"{self.direction} {self.rows} x {self.inner} @ {self.inner} x {self.cols}"


def projection_shapes(model: torch.nn.Module) -> Counter[tuple[int, int]]:
    """``(in_features, out_features)`` of every linear projection of the decoder (the vocabulary
    projection is not part of the decoder), with how many there are."""
    decoder = model.get_decoder()
    return Counter(
        (module.in_features, module.out_features)
        for module in decoder.modules()
        if isinstance(module, torch.nn.Linear)
    )


def gemms(model: torch.nn.Module, rows: tuple[int, ...]) -> list[Gemm]:
    found = []
    for count_rows in rows:
        for (features_in, features_out), count in sorted(projection_shapes(model).items()):
            found.append(Gemm(count_rows, features_in, features_out, "forward", count))
            found.append(Gemm(count_rows, features_out, features_in, "backward", count))
    return found


def _operands(
    gemm: Gemm, generator: torch.Generator, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random operands in ``dtype`` on ``device``: each dtype's peak is measured in its own precision."""

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    left = random(gemm.rows, gemm.inner)
    if gemm.direction == "forward":  # nn.Linear multiplies by a transposed view of W [out, in]
        return left, random(gemm.cols, gemm.inner).t()
    return left, random(gemm.inner, gemm.cols)


def calls_lasting(once: Callable[[], object], seconds: float) -> int:
    """How many calls of ``once`` take about ``seconds``: a lone small matmul is too short to time. Calls
    double until a batch of them takes half of ``seconds`` (after one warm call), then scale."""
    once()
    calls = 1
    while True:
        started = time.perf_counter()
        for _ in range(calls):
            once()
        elapsed = time.perf_counter() - started
        if elapsed >= seconds / 2 or calls >= 2**20:
            return max(1, round(calls * seconds / max(elapsed, 1e-9)))
        calls *= 2


def _timed_rates(bench: Bench, shapes: list[Gemm], dtype_name: str) -> dict[Gemm, list[float]]:
    """GFLOP/s per round of every shape in one dtype, the shapes interleaved round by round."""
    config = bench.config
    generator = torch.Generator().manual_seed(config.seed)
    device = bench.bare.device
    runs = {}
    for gemm in shapes:
        left, right = _operands(gemm, generator, device, DTYPES[dtype_name])

        def once(left=left, right=right) -> None:
            torch.matmul(left, right)

        calls = calls_lasting(once, config.gemm_min_seconds)

        def run(once=once, calls=calls) -> None:
            for _ in range(calls):
                once()

        runs[gemm] = (calls, run)
    seconds = bench.interleaved(f"gemm {dtype_name}", {gemm.label: run for gemm, (_, run) in runs.items()})
    return {
        gemm: [gemm.flop / (s / calls) / 1e9 for s in seconds[gemm.label]]
        for gemm, (calls, _) in runs.items()
    }


def bench_gemm(bench: Bench) -> Section:
    """The peak in every dtype of the run (``bench.dtypes``), one table of shapes and one model mix each."""
    config = bench.config
    shapes = gemms(bench.bare.model, config.gemm_rows)
    section = Section(
        "gemm",
        f"{' and '.join(bench.dtypes)} matmul at the base model's projection shapes on "
        f"{bench.bare.device}, {torch.get_num_threads()} torch threads",
    )
    peaks: dict[str, tuple[float, str]] = {}
    for dtype_name in bench.dtypes:
        rates = _timed_rates(bench, shapes, dtype_name)
        medians = {gemm: statistics.median(values) for gemm, values in rates.items()}
        best = max(medians, key=medians.__getitem__)
        peaks[dtype_name] = (medians[best], best.label)
        table = FactTable(
            f"{dtype_name} GFLOP/s per shape (median of rounds)",
            ["shape", "per layer", "GFLOP/s", "min .. max"],
        )
        for gemm in shapes:
            values = rates[gemm]
            table.rows.append(
                [gemm.label, gemm.count, medians[gemm], f"{min(values):.1f} .. {max(values):.1f}"]
            )
        mix = FactTable(
            f"{dtype_name} model mix: one layer's projections, both directions", ["rows", "GFLOP/s"]
        )
        for rows in config.gemm_rows:
            chosen = [g for g in shapes if g.rows == rows]
            flop = sum(g.count * g.flop for g in chosen)
            time_taken = sum(g.count * g.flop / (medians[g] * 1e9) for g in chosen)
            mix.rows.append([rows, flop / time_taken / 1e9])
        section.tables += [table, mix]
        section.facts.setdefault("mix_gflops", {})[dtype_name] = {
            str(rows): value for rows, value in mix.rows
        }
        section.notes.append(
            f"{dtype_name} GEMM peak {medians[best]:.1f} GFLOP/s ({best.label}): the best median over these "
            f"shapes; 2 x rows x inner x cols FLOP per matmul, operands {dtype_name} and freshly random."
        )
    best_dtype = max(peaks, key=lambda name: peaks[name][0])
    section.facts.update(
        {
            PEAK_KEY: peaks[best_dtype][0],
            "peak_shape": peaks[best_dtype][1],
            "peak_dtype": best_dtype,
            "peaks_gflops": {name: value for name, (value, _) in peaks.items()},
        }
    )
    if len(peaks) > 1:
        section.notes.append(
            f"best peak: {best_dtype}, "
            + ", ".join(
                f"{name} {value / peaks[best_dtype][0]:.2f}x of it" for name, (value, _) in peaks.items()
            )
        )
    bench.shared[PEAK_KEY] = peaks
    return section


def peak(bench: Bench) -> tuple[float, str, str]:
    """(GFLOP/s, shape, dtype) of the best GEMM peak of this run over its dtypes: the ``gemm`` section's
    when it ran, else measured now with the same settings."""
    if PEAK_KEY not in bench.shared:
        bench.log("gemm: measuring the GEMM peaks for the training figures")
        bench_gemm(bench)
    peaks = bench.shared[PEAK_KEY]
    best = max(peaks, key=lambda name: peaks[name][0])
    return (*peaks[best], best)
