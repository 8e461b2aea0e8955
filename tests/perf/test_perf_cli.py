"""``tailorlm perf engine``: sections in order, one JSON object, the printed tables."""

from __future__ import annotations

import io
import json
import mmap
import time

import pytest
from rich.console import Console
from typer.testing import CliRunner

from tailorlm import kinds
from tailorlm.cli import app, perf_tables
from tailorlm.perf import runner
from tailorlm.perf.harness import Bench, Section


def test_sections_are_every_kind_then_each_question():
    assert runner.SECTIONS[: len(kinds.MODEL_KINDS)] == tuple(kinds.MODEL_KINDS)
    assert runner.SECTIONS[len(kinds.MODEL_KINDS) :] == (
        "decode",
        "decode-single",
        "gemm",
        "train",
        "train-task",
        "memory",
        "load",
        "bytes",
    )


def test_sections_are_parsed_in_benchmark_order():
    assert runner.parse_sections(None) == list(runner.SECTIONS)
    assert runner.parse_sections(["bytes,lora", "train"]) == ["lora", "train", "bytes"]
    with pytest.raises(ValueError, match="unknown section"):
        runner.parse_sections(["speed"])


def test_a_section_carries_its_machine_readings(small, monkeypatch):
    size = 64 * 2**20
    page = mmap.PAGESIZE

    def allocate(bench: Bench) -> Section:
        # Fresh pages from the kernel, each written to: resident only from here on, whatever ran before.
        # (A tensor could reuse heap pages an earlier test left resident, and then RSS need not grow.)
        with mmap.mmap(-1, size) as block:
            for offset in range(0, size, page):
                block[offset] = 1
            time.sleep(0.05)  # held for several of the fallback sampler's 10 ms ticks
            return Section("allocate", f"{size // page} pages")

    monkeypatch.setitem(runner.RUNNERS, "allocate", allocate)
    section = runner.run_section(Bench(small), "allocate", threads=1)
    facts = section.facts
    assert {"load_average_1min", "cpu_busy", "section_seconds", "rss_mb_peak", "rss_method"} <= set(facts)
    assert facts["section_seconds"] >= 0.05 and facts["cpu_busy"] >= 0
    assert len(facts["load_average_1min"]) == 2 and min(facts["load_average_1min"]) >= 0
    assert 0 < facts["rss_mb_start"] <= facts["rss_mb_peak"] and facts["rss_mb_end"] <= facts["rss_mb_peak"]
    assert facts["rss_mb_peak_increase"] >= 0.8 * size / 2**20


def test_cli_prints_one_json_object_and_the_same_figures_as_tables():
    arguments = ["perf", "engine", "--model", "tiny", "--json", "--resident", "12", "--repeats", "1"]
    result = CliRunner().invoke(app, [*arguments, "--tokens", "40", "--only", "ia3,bytes"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [s["name"] for s in payload["sections"]] == ["ia3", "bytes", "precision"]
    assert payload["dtypes"] == ["fp32"] and payload["device"] == "cpu"  # the suite's TAILORLM_DTYPE
    assert payload["passed"] + payload["missed"] == 2
    assert payload["threads"] >= 1 and payload["config"]["resident"] == 12
    assert payload["peak_rss_mb"] > 0
    printed = io.StringIO()
    perf_tables.render(payload, Console(file=printed, width=200))
    text = printed.getvalue()
    assert "engine speed vs bare base model" in text and "bytes per user" in text
    assert "targets passed" in text and "machine:" in text


def test_cli_names_a_wrong_section():
    result = CliRunner().invoke(app, ["perf", "engine", "--model", "tiny", "--only", "nope"])
    assert result.exit_code == 2
    assert "unknown section" in result.output
