"""A method answers one user's question outside any benchmark run: everything it needs is handed to it in
``MethodDeps``, and ``tailorlm.methods`` imports nothing of ``tailorlm.bench``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tailorlm.data import load_task
from tailorlm.methods.deps import MethodDeps, base_loader
from tailorlm.methods.personal import PersonalSetup
from tailorlm.methods.recipes import Recipe
from tailorlm.methods.setups import OPPU_PERSONAL, TaskAdapterSetup
from test_import_graph import import_graph

# Runs in a fresh interpreter, so ``sys.modules`` shows what answering one question really imports.
ONE_QUESTION = """
import json, sys
from pathlib import Path

from tailorlm.data import load_task
from tailorlm.methods.deps import MethodDeps, MethodSettings, base_loader
from tailorlm.methods.registry import methods_for
from tailorlm.store.store import ModuleStore

task = load_task("verbagg")
user = next(u for u in task.users if u.test and task.training_examples(u))
modules = Path(sys.argv[1])
uses = []
deps = MethodDeps(
    task,
    base_loader("tiny"),
    modules,
    MethodSettings(epochs=1, users_per_step=1, batch_size=32),  # one training step: a smoke test
    trace=uses.append,
)
answerer = methods_for(task)["peft-lora"].prepare(deps, [user])
[answer] = answerer.answer([(user, user.test[0])], "likelihood")
print(json.dumps({
    "answer": answer,
    "labels": list(task.labels),
    "stored": ModuleStore(modules / "peft-lora").users(),
    "user": user.id,
    "trained_on": sorted({u.prompt.example for u in uses if u.purpose == "train"}),
    "train_ids": sorted(e.id for e in task.training_examples(user)),
    "bench_modules": sorted(m for m in sys.modules if m.startswith("tailorlm.bench")),
}))
"""


def test_one_users_question_is_answered_without_the_benchmark(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", ONE_QUESTION, str(tmp_path / "modules")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["answer"] in result["labels"]
    assert result["stored"] == [result["user"]]  # one module, that user's, under the root it was given
    assert result["trained_on"] == result["train_ids"]
    assert result["bench_modules"] == []


def test_methods_import_nothing_of_the_benchmark_or_the_ui():
    graph, _ = import_graph()
    found = {unit: graph["methods"][unit] for unit in ("bench", "cli", "console") if unit in graph["methods"]}
    assert not found, f"tailorlm.methods imports {found}"


def test_the_task_adapter_is_not_asked_about_its_own_training_users(tmp_path):
    task = load_task("verbagg")
    user = next(u for u in task.users if u.test)

    def no_model():
        raise AssertionError("refusing must come before any model is loaded")

    deps = MethodDeps(task, no_model, tmp_path, adapter_users=[user])
    with pytest.raises(ValueError, match="adapter users must be other users"):
        TaskAdapterSetup().prepare(deps, "task-adapter", Recipe(), [user])
    oppu = PersonalSetup(OPPU_PERSONAL, on_task_adapter=True)
    with pytest.raises(ValueError, match="adapter users must be other users"):
        oppu.prepare(deps, "oppu", Recipe(), [user])


def test_modules_go_where_the_caller_says(tmp_path):
    deps = MethodDeps(load_task("verbagg"), base_loader("tiny"), tmp_path / "mine")
    assert deps.store("peft-lora").root == tmp_path / "mine" / "peft-lora"
    assert isinstance(deps.modules, Path)
