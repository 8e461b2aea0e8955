"""Bytes per user at rest, for every registered kind."""

from __future__ import annotations

from pathlib import Path

from tailorlm import kinds
from tailorlm.perf import size


def test_bytes_per_user_equal_the_files_on_disk(bench, tmp_path):
    section = size.bench_bytes(bench, tmp_path)
    rows = section.facts["modules"]
    assert [row["spec"] for row in rows] == [kinds.spec_to_dict(s) for s in size.at_rest_specs()]
    assert [row["spec"]["kind"] for row in rows][: len(kinds.MODEL_KINDS)] == list(kinds.MODEL_KINDS)
    for row in rows:
        for dtype in ("fp16", "fp32"):
            files = [f for f in Path(row[f"folder_{dtype}"]).iterdir() if f.is_file()]
            assert row[f"bytes_{dtype}"] == sum(f.stat().st_size for f in files)
        assert row["weights_bytes_fp16"] < row["bytes_fp16"] < row["bytes_fp32"]
        assert row["weights_bytes_fp16"] >= 2 * row["numbers"]
    (check,) = section.checks
    lora = rows[list(kinds.MODEL_KINDS).index("lora")]
    assert check.value == lora["bytes_fp16"] and check.unit == "B" and not check.higher_is_better
    assert section.tables[0].rows[0][0] == "lora"
