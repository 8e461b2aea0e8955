"""The report's tables: one formatted cell per header, methods best first, partial ones marked."""

from __future__ import annotations

from bench_helpers import METHODS, N_USERS, PARTIAL_USERS, line, no_reference_run, write_run

from tailorlm.bench.report.tables import (
    comparison_rows,
    method_rows,
    num,
    p_text,
    setting_rows,
    signed,
    users_needed_rows,
)
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


def test_users_needed_rows_against_the_non_personal_reference(planted, tmp_path):
    _, results = planted
    headers, rows = users_needed_rows(results)
    # Accuracy has no stated sizes: only the observed difference is sized.
    assert headers == ["method", "sd of per-user differences", "delta", "users for delta"]
    by_method = {row[0]: row for row in rows}
    assert "zero-shot" not in by_method  # the reference itself
    # peft-lora is right on exactly 3 more of 10 for every user: no spread, so two users show it.
    assert by_method["peft-lora"][1:] == ["0.000", "+0.300", "2"]
    # few-shot is one user up, one down: no difference to size.
    assert by_method["few-shot"][2:] == ["+0.000", "-"]
    assert not users_needed_rows(summarize(no_reference_run(tmp_path)))[1]


def test_users_needed_rows_size_rouges_published_margins(tmp_path):
    # Gold "w1 w2 w3 w4": "w1" scores ROUGE-1 F 0.4, "w1 w2" 0.667. The method gains 4/15 on two of four
    # users: mean 2/15, sd 4/sqrt(675) = 0.154; n = (2.4865 x 0.154 / d)^2: 8.2 -> 9 users for 2/15,
    # 1465.5 -> 1466 for 0.01, 366.4 -> 367 for 0.02.
    task = {"name": "tate", "kind": "generation", "metrics": ["rouge1", "rougeL"], "source": "synthetic"}
    methods = {"task-adapter": {**METHODS["zero-shot"], "decoding": "generate"}, "oppu": METHODS["oppu"]}
    gold = ["w1 w2 w3 w4"]
    users = {f"u{i}": {"history": 4} for i in range(4)}
    lines = {
        "task-adapter": [line(u, gold, ["w1"]) for u in users],
        "oppu": [line(u, gold, ["w1 w2" if i < 2 else "w1"]) for i, u in enumerate(users)],
    }
    headers, rows = users_needed_rows(summarize(write_run(tmp_path / "run", task, methods, users, lines)))
    assert headers[-2:] == ["users for 0.01", "users for 0.02"]
    assert rows == [["oppu", "0.154", "+0.133", "9", "1466", "367"]]


def test_setting_rows_name_the_task_and_the_statistics(planted):
    _, results = planted
    settings = dict(setting_rows(results))
    assert settings["task"] == "verbagg" and settings["config.profile"] == "quick"
    assert "bootstrap" in settings["statistics"]


def test_cells_format_missing_values_and_tiny_p_values():
    assert num(None) == "-" and num(0.12345) == "0.123" and num(2.0, 1) == "2.0"
    assert p_text(0.0001) == "p<0.001" and p_text(0.05) == "p=0.050"
    assert signed(0.3) == "+0.300" and signed(-0.2) == "-0.200" and signed(-1e-17) == "+0.000"
