"""The README's Python example runs as printed (on the tiny test model, so it takes seconds)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from tailorlm import models
from tailorlm.store.store import folder_name

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Python\n") :]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "the README's Python section has no python code block"
    return match.group(1)


def test_readme_python_example_runs(tokenizer, monkeypatch, tmp_path, capsys):
    real_load = models.load_base

    def tiny_default(name=None, **options):
        # The example loads the default model; the test gives it the tiny model of the same tokenizer.
        return models.tiny_model(seed=0, tokenizer=tokenizer) if name is None else real_load(name, **options)

    monkeypatch.setattr(models, "load_base", tiny_default)
    monkeypatch.chdir(tmp_path)
    exec(compile(python_example(), str(README), "exec"), {"__name__": "readme_example"})

    printed = capsys.readouterr().out.strip().splitlines()
    answers = ast.literal_eval(printed[0])  # the printed list of three generated strings
    assert isinstance(answers, list) and len(answers) == 3
    folders = {p.name for p in (tmp_path / "modules").iterdir() if p.is_dir()}
    assert folders == {folder_name("ann"), folder_name("bob")}  # one folder per user, named by the id's hash
    results = json.loads((tmp_path / "runs" / "mine" / "results.json").read_text())
    assert set(results["methods"]) == {"user-majority", "zero-shot", "peft-lora"}


@pytest.mark.parametrize("command", ["make demo", "make test"])
def test_readme_names_the_two_commands(command):
    assert command in README.read_text(encoding="utf-8")
