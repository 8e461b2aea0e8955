"""The last section of ``tailorlm perf engine``: what ``--dtype auto`` chooses on this machine for each
phase and why (its measured figures), and every section that ran in several dtypes side by side: the
engine's time in fp32 against bf16, with the targets of issue 20 on the real training rows (bf16 trains
at least 1.7x as fast as fp32; the engine in auto's dtype at least 3.5x stock PEFT in fp32)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace

from tailorlm import precision, settings
from tailorlm.device import AUTO
from tailorlm.perf.contenders import PEFT_TRAIN
from tailorlm.perf.harness import Bench, FactTable, PerfConfig, Section, Timing, perf_dtype

TARGET_BF16_TRAIN = 1.7  # training examples/s on the task rows, bf16 against fp32
TARGET_AUTO_VS_PEFT = 3.5  # the engine in auto's dtype against stock PEFT in fp32, task rows
REFERENCE = "fp32"
TASK_SECTION = "train-task"


def _by_dtype(results: Sequence[Section]) -> dict[str, dict[str, Section]]:
    """section name -> dtype -> section, for the sections that ran in a dtype of their own."""
    found: dict[str, dict[str, Section]] = {}
    for section in results:
        if section.dtype is not None:
            found.setdefault(section.name, {})[section.dtype] = section
    return found


def _suffixed(name: str, dtype: str) -> str:
    return f"{name} ({dtype})"


def precision_section(config: PerfConfig, bench: Bench, results: Sequence[Section]) -> Section:
    """What the run's dtypes were and why; with ``auto`` (perf's default), its measured choice per phase."""
    section = Section(
        "precision",
        f"Precision on {bench.bare.device}: the sections in {' and '.join(bench.dtypes)} side by side",
    )
    section.facts["dtypes"] = list(bench.dtypes)
    choices = {}
    if perf_dtype(config) == AUTO:
        choices = {
            phase: precision.choose(bench.bare.model.config, bench.bare.device, phase)
            for phase in precision.PHASES
        }
        section.facts["auto"] = {phase: asdict(choice) for phase, choice in choices.items()}
        for choice in choices.values():
            section.notes.append(f"auto, {choice.reason}")
    else:
        section.notes.append(
            f"dtype {bench.dtypes[0]} asked for (--dtype or {settings.DTYPE_ENV}): auto not measured"
        )
    by_dtype = _by_dtype(results)
    others = [d for d in bench.dtypes if d != REFERENCE]
    if REFERENCE not in bench.dtypes or not others:
        section.notes.append("one dtype in this run: no side-by-side (run without --dtype for fp32 and bf16)")
        return section
    table = FactTable(
        "the engine's median time per section (its first contender), each dtype against fp32",
        ["section", "contender", *[f"{d} s" for d in bench.dtypes], *[f"{d} speed vs fp32" for d in others]],
    )
    for name, sections in by_dtype.items():
        if REFERENCE not in sections or not sections[REFERENCE].timings:
            continue
        contender = sections[REFERENCE].timings[0].name
        medians = {d: sections[d].timing(contender).median for d in bench.dtypes if d in sections}
        table.rows.append(
            [
                name,
                contender,
                *[medians.get(d) for d in bench.dtypes],
                *[f"{medians[REFERENCE] / medians[d]:.2f}x" if d in medians else None for d in others],
            ]
        )
    section.tables.append(table)
    task = by_dtype.get(TASK_SECTION, {})
    if REFERENCE in task and "bf16" in task and choices:
        _task_checks(section, task, choices[precision.BATCHED].dtype)
    return section


def _task_checks(section: Section, task: dict[str, Section], auto_dtype: str) -> None:
    """The issue's two training targets, from the task sections' own timings."""
    engine = task[REFERENCE].timings[0].name
    full, half, chosen = task[REFERENCE], task["bf16"], task.get(auto_dtype, task[REFERENCE])
    section.timings = [
        _renamed(full.timing(engine), _suffixed(engine, REFERENCE)),
        _renamed(half.timing(engine), _suffixed(engine, "bf16")),
        _renamed(full.timing(PEFT_TRAIN), _suffixed(PEFT_TRAIN, REFERENCE)),
    ]
    section.ratio(
        f"{TASK_SECTION}: training examples/s, bf16 vs fp32",
        _suffixed(engine, REFERENCE),
        _suffixed(engine, "bf16"),
        TARGET_BF16_TRAIN,
    )
    chosen_name = _suffixed(engine, auto_dtype)
    if chosen_name not in {t.name for t in section.timings}:
        section.timings.append(_renamed(chosen.timing(engine), chosen_name))
    section.ratio(
        f"{TASK_SECTION}: engine in auto's dtype ({auto_dtype}) vs stock PEFT in fp32",
        _suffixed(PEFT_TRAIN, REFERENCE),
        chosen_name,
        TARGET_AUTO_VS_PEFT,
    )


def _renamed(timing: Timing, name: str) -> Timing:
    return replace(timing, name=name)
