"""The precision section of ``perf engine``: by default every per-dtype section runs in fp32 and bf16, and
the last section shows what ``auto`` measured and the engine's time in each dtype side by side."""

from __future__ import annotations

import dataclasses

from tailorlm import settings
from tailorlm.perf import runner
from tailorlm.perf.contenders import ENGINE
from tailorlm.perf.harness import run_dtypes


def test_a_dtype_asked_for_is_the_only_one_and_auto_runs_fp32_and_bf16(small, monkeypatch):
    assert run_dtypes(dataclasses.replace(small, dtype="bf16")) == ("bf16",)
    monkeypatch.delenv(settings.DTYPE_ENV)
    assert run_dtypes(dataclasses.replace(small, dtype=None, device="cpu")) == ("fp32", "bf16")


def test_auto_runs_each_section_in_both_dtypes_and_compares_them(small, tmp_path, monkeypatch):
    monkeypatch.setenv(settings.HOME_ENV, str(tmp_path))  # auto measures into a fresh cache
    monkeypatch.delenv(settings.DTYPE_ENV)
    config = dataclasses.replace(small, dtype=None, device="cpu")
    payload = runner.run_benchmark(config, ["lora", "bytes"])
    names = [(s["name"], s["dtype"]) for s in payload["sections"]]
    assert names == [("lora", "fp32"), ("lora", "bf16"), ("bytes", None), ("precision", None)]
    assert payload["dtypes"] == ["fp32", "bf16"] and payload["device"] == "cpu"
    precision = payload["sections"][-1]
    assert set(precision["facts"]["auto"]) == {"batched", "decode"}
    assert any(note.startswith("auto, batched") for note in precision["notes"])
    (table,) = precision["tables"]
    (row,) = table["rows"]
    lora = {s["dtype"]: s for s in payload["sections"] if s["name"] == "lora"}
    medians = {d: next(t for t in s["timings"] if t["name"] == ENGINE)["median_s"] for d, s in lora.items()}
    assert row[:4] == ["lora", ENGINE, medians["fp32"], medians["bf16"]]
    assert row[4] == f"{medians['fp32'] / medians['bf16']:.2f}x"
    assert list(tmp_path.joinpath("precision").glob("*.json"))  # the measurement was cached there
