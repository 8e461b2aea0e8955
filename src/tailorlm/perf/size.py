"""How many bytes does one user's module take at rest? Weights and config files of a module folder, fp16
(the default storage dtype) and fp32, for the default spec of every registered kind, plus LoRA on all
four attention projections (docs/engine.md reports that variant too)."""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import torch

from tailorlm import kinds
from tailorlm.engine.engine import Engine
from tailorlm.engine.slots import SlotManager
from tailorlm.kinds import ModuleSpec
from tailorlm.kinds.lora import LoraSpec
from tailorlm.perf import workloads
from tailorlm.perf.harness import Bench, Check, FactTable, Section
from tailorlm.store import module_folder

# The target, for the default spec of the kind it names: 1 MB read as 10^6 bytes, the stricter
# reading.
TARGET_BYTES_BY_KIND = {"lora": 1_000_000}
VARIANTS: tuple[ModuleSpec, ...] = (LoraSpec(targets=("q_proj", "k_proj", "v_proj", "o_proj")),)


def at_rest_specs() -> list[ModuleSpec]:
    """Every registered kind's default spec, then the variants."""
    return [kinds.default_spec(name) for name in kinds.MODEL_KINDS] + list(VARIANTS)


def bench_bytes(bench: Bench, folder: str | Path | None = None) -> Section:
    """Modules are written under ``folder`` when given (kept), else to a temporary folder."""
    section = Section("bytes", "Bytes per user at rest (weights + config files)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="tailorlm-perf-") as scratch:
        root = Path(folder) if folder is not None else Path(scratch)
        for spec in at_rest_specs():
            label = workloads.describe(spec)
            engine = Engine(bench.fresh_base(), spec, slots=2)
            slot = SlotManager(engine.bank).place(
                "user", generator=torch.Generator().manual_seed(bench.config.seed)
            )
            slug = "".join(c if c.isalnum() else "-" for c in label)
            half = module_folder.save_module(engine, slot, root / slug / "float16")
            full = module_folder.save_module(engine, slot, root / slug / "float32", dtype="float32")
            row = {
                "module": label,
                "spec": kinds.spec_to_dict(spec),
                "numbers": engine.bank.parameter_count(),
                "bytes_fp16": module_folder.module_bytes(half),
                "bytes_fp32": module_folder.module_bytes(full),
                "weights_bytes_fp16": (half / module_folder.WEIGHTS_FILE).stat().st_size,
            }
            if folder is not None:
                row.update({"folder_fp16": str(half), "folder_fp32": str(full)})
            rows.append(row)
            del engine  # one wrapped base at a time
            gc.collect()
    section.facts["modules"] = rows
    section.tables.append(
        FactTable(
            "bytes per user",
            ["module", "numbers per user", "fp16 at rest", "fp32 at rest", "fp16 weights file"],
            [
                [r["module"], r["numbers"], r["bytes_fp16"], r["bytes_fp32"], r["weights_bytes_fp16"]]
                for r in rows
            ],
        )
    )
    for kind, target in TARGET_BYTES_BY_KIND.items():
        spec = kinds.default_spec(kind)
        row = next((r for r in rows if r["spec"] == kinds.spec_to_dict(spec)), None)
        if row is not None:
            label = f"{row['module']} ({workloads.settings_text(spec)}) bytes per user at rest (fp16)"
            section.checks.append(Check(label, row["bytes_fp16"], target, False, unit="B"))
    section.notes.append("1 MB = 1,000,000 bytes; fp16 is the default storage dtype.")
    return section
