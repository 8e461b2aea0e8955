"""The report's tables: one formatted cell per header, methods best first, partial ones marked."""

from __future__ import annotations

from bench_helpers import N_USERS, PARTIAL_USERS, no_reference_run

from tailorlm.bench.report.tables import comparison_rows, method_rows, num, p_text, setting_rows, signed
from tailorlm.bench.results import summarize


def test_method_rows_are_best_first_with_a_cell_per_header(planted):
    _, results = planted
    headers, rows = method_rows(results)
    assert all(len(row) == len(headers) for row in rows)
    assert [row[1].removesuffix(" (partial)") for row in rows] == results["ranking"]
    oppu = rows[results["ranking"].index("oppu")]
    assert oppu[1] == "oppu (partial)" and f"{PARTIAL_USERS}/{N_USERS} (partial)" in oppu


def test_comparison_rows_have_columns_only_for_references_with_results(planted, tmp_path):
    _, results = planted
    headers, rows = comparison_rows(results)
    assert headers[1:] == [
        "beats zero-shot?",
        "vs zero-shot: delta, p",
        "beats user-majority?",
        "vs user-majority: delta, p",
        "beats few-shot?",
        "vs few-shot: delta, p",
    ]
    assert all(len(row) == len(headers) for row in rows)
    headers, rows = comparison_rows(summarize(no_reference_run(tmp_path)))
    assert headers == ["method"] and [row[0] for row in rows] == ["peft-lora", "few-shot (partial)"]


def test_setting_rows_name_the_task_and_the_statistics(planted):
    _, results = planted
    settings = dict(setting_rows(results))
    assert settings["task"] == "verbagg" and settings["config.profile"] == "quick"
    assert "bootstrap" in settings["statistics"]


def test_cells_format_missing_values_and_tiny_p_values():
    assert num(None) == "-" and num(0.12345) == "0.123" and num(2.0, 1) == "2.0"
    assert p_text(0.0001) == "p<0.001" and p_text(0.05) == "p=0.050"
    assert signed(0.3) == "+0.300" and signed(-0.2) == "-0.200" and signed(-1e-17) == "+0.000"
