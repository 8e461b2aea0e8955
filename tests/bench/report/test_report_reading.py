"""The reading paragraph says what the results show, and no more."""

from __future__ import annotations

from bench_helpers import N_USERS, no_reference_run

from tailorlm.bench.report.reading import reading
from tailorlm.bench.results import summarize


def test_reading_states_only_what_the_numbers_show(planted):
    _, results = planted
    text = reading(results)
    assert text.startswith(f"5 of 5 methods have results on verbagg ({N_USERS} test users")
    assert "ranks first" in text
    assert "peft-lora (+0.300" in text and "few-shot (+0.000" not in text


def test_reading_names_the_partial_methods(planted):
    _, results = planted
    assert "oppu" in reading(results) and "Partial methods" in reading(results)


def test_reading_states_a_missing_reference(tmp_path):
    results = summarize(no_reference_run(tmp_path))
    assert "nothing was compared" in reading(results)
