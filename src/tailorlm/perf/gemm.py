"""How fast can this machine multiply matrices of the base model's shapes? ``torch.matmul`` in the model's
dtype on the configured threads, for every distinct projection shape of the base's decoder
(SmolLM2-135M: 576 -> 576 for q and o, 576 -> 192 for k and v, 576 -> 1536 for gate and up, 1536 -> 576
for down), at several row counts (a row is one token position), in both directions training runs them:

- forward, ``x [rows, in] @ W.T [in, out]`` (what ``nn.Linear`` does);
- backward to the activations, ``grad [rows, out] @ W [out, in]`` (a frozen base needs no weight grads).

Each takes 2 x rows x in x out FLOP. The best median GFLOP/s over these shapes is the GEMM peak the
training sections divide their useful FLOP/s by; the model mix (every projection of one layer, both
directions, weighted by how often the layer has it) says what a pass made only of these GEMMs would reach.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

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
    gemm: Gemm, generator: torch.Generator, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random operands in the dtype and on the device of ``like`` (a base weight): the peak that matters
    is the one of the precision the model computes in."""

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=like.device, dtype=like.dtype)

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


def _dtype_name(bench: Bench) -> str:
    return str(bench.bare.dtype).removeprefix("torch.")


def bench_gemm(bench: Bench) -> Section:
    config = bench.config
    generator = torch.Generator().manual_seed(config.seed)
    shapes = gemms(bench.bare.model, config.gemm_rows)
    runs = {}
    for gemm in shapes:
        left, right = _operands(gemm, generator, next(bench.bare.model.parameters()))

        def once(left=left, right=right) -> None:
            torch.matmul(left, right)

        calls = calls_lasting(once, config.gemm_min_seconds)

        def run(once=once, calls=calls) -> None:
            for _ in range(calls):
                once()

        runs[gemm] = (calls, run)
    seconds = bench.interleaved("gemm", {gemm.label: run for gemm, (_, run) in runs.items()})
    rates = {}
    for gemm, (calls, _) in runs.items():
        per_call = [s / calls for s in seconds[gemm.label]]
        rates[gemm] = [gemm.flop / s / 1e9 for s in per_call]
    medians = {gemm: statistics.median(values) for gemm, values in rates.items()}
    best = max(medians, key=medians.__getitem__)
    section = Section(
        "gemm",
        f"{_dtype_name(bench)} matmul at the base model's projection shapes, "
        f"{torch.get_num_threads()} torch threads",
    )
    table = FactTable("GFLOP/s per shape (median of rounds)", ["shape", "per layer", "GFLOP/s", "min .. max"])
    for gemm in shapes:
        values = rates[gemm]
        table.rows.append([gemm.label, gemm.count, medians[gemm], f"{min(values):.1f} .. {max(values):.1f}"])
    mix = FactTable("model mix: one layer's projections, both directions", ["rows", "GFLOP/s"])
    for rows in config.gemm_rows:
        chosen = [g for g in shapes if g.rows == rows]
        flop = sum(g.count * g.flop for g in chosen)
        time_taken = sum(g.count * g.flop / (medians[g] * 1e9) for g in chosen)
        mix.rows.append([rows, flop / time_taken / 1e9])
    section.tables = [table, mix]
    section.facts.update(
        {
            PEAK_KEY: medians[best],
            "peak_shape": best.label,
            "mix_gflops": {str(rows): value for rows, value in mix.rows},
        }
    )
    section.notes.append(
        f"GEMM peak {medians[best]:.1f} GFLOP/s ({best.label}): the best median over these shapes; "
        f"2 x rows x inner x cols FLOP per matmul, operands {_dtype_name(bench)} and freshly random."
    )
    bench.shared[PEAK_KEY] = (medians[best], best.label)
    return section


def peak(bench: Bench) -> tuple[float, str]:
    """(GFLOP/s, shape) of the GEMM peak of this run: the ``gemm`` section's when it ran, else measured
    now with the same settings."""
    if PEAK_KEY not in bench.shared:
        bench.log("gemm: measuring the GEMM peak for the training figures")
        bench_gemm(bench)
    return bench.shared[PEAK_KEY]
