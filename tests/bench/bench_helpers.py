"""Synthetic benchmark run folders with planted differences, shared by the results and report tests.

Imported as ``bench_helpers`` (like tests/engine/engine_helpers.py): pytest puts tests/bench on sys.path when
it loads tests/bench/conftest.py, which also serves the run built here as the ``planted`` fixture.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

LABELS = ["no", "perhaps", "yes"]
CLASSIFICATION = {
    "name": "verbagg",
    "kind": "classification",
    "labels": LABELS,
    "metrics": ["accuracy", "f1", "lenient_accuracy"],
    "source": "synthetic",
}
RATING = {
    "name": "lamp:3",
    "kind": "rating",
    "labels": ["1", "2", "3", "4", "5"],
    "metrics": ["mae", "rmse"],
    "source": "synthetic",
}
METHODS = {
    "zero-shot": {"family": "non-personal", "description": "base model", "decoding": "likelihood"},
    "user-majority": {"family": "simple-baseline", "description": "user's majority", "decoding": "rule"},
    "peft-lora": {"family": "parameter-personal", "description": "LoRA per user", "decoding": "likelihood"},
    "few-shot": {"family": "prompt-personal", "description": "3 shots", "decoding": "likelihood"},
    "oppu": {"family": "oppu", "description": "task LoRA + user LoRA", "decoding": "likelihood"},
}
N_USERS, PER_USER, PARTIAL_USERS = 30, 10, 20


def write_run(root: Path, task: dict, methods: dict, users: dict, lines: dict[str, list[dict | str]]) -> Path:
    """A run folder as the runner writes it; a line given as a string is written verbatim."""
    root.mkdir(parents=True, exist_ok=True)
    run = {"task": task, "config": {"profile": "quick", "seed": 0}, "methods": methods, "users": users}
    (root / "run.json").write_text(json.dumps({**run, "started": "2026-11-22T03:00:00Z"}))
    (root / "predictions").mkdir(exist_ok=True)
    for method, records in lines.items():
        text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
        (root / "predictions" / f"{method}.jsonl").write_text(text)
    return root


def line(user: str, golds: list[str], preds: list[str], seconds: float = 1.0) -> dict:
    """One predictions line: {"user", "seconds", "examples": [{"id", "gold", "golds", "prediction"}]}."""
    examples = [
        {"id": f"{user}/{i}", "gold": g, "golds": [g], "prediction": p}
        for i, (g, p) in enumerate(zip(golds, preds, strict=True))
    ]
    return {"user": user, "seconds": seconds, "examples": examples}


def answers(golds: list[str], correct: int) -> list[str]:
    """The first ``correct`` answers right, the rest a wrong label."""
    return [g if i < correct else LABELS[(LABELS.index(g) + 1) % 3] for i, g in enumerate(golds)]


def planted_run(root: Path) -> Path:
    """zero-shot right on 3-6 of 10 per user; peft-lora 3 more; few-shot the same on average (one user up,
    one down); user-majority 2 right; oppu like peft-lora but interrupted after 20 users."""
    rng = np.random.default_rng(7)
    users = {
        f"u{i:02d}": {"history": int(5 + 4 * i), "train": 8, "val": 1, "test": PER_USER}
        for i in range(N_USERS)
    }
    lines: dict[str, list[dict | str]] = {name: [] for name in METHODS}
    for index, user in enumerate(users):
        golds = [str(x) for x in rng.choice(LABELS, PER_USER)]
        base = int(rng.integers(3, 7))
        shift = 1 if index == 0 else -1 if index == 1 else 0
        lines["zero-shot"].append(line(user, golds, answers(golds, base)))
        lines["peft-lora"].append(line(user, golds, answers(golds, base + 3), seconds=2.0))
        lines["few-shot"].append(line(user, golds, answers(golds, base + shift)))
        lines["user-majority"].append(line(user, golds, answers(golds, 2), seconds=0.0))
        if index < PARTIAL_USERS:
            lines["oppu"].append(line(user, golds, answers(golds, base + 3)))
    return write_run(root, CLASSIFICATION, METHODS, users, lines)


def no_reference_run(root: Path) -> Path:
    """One user; peft-lora has results, few-shot (no family) none, so no reference family has results."""
    users = {"u1": {"history": 3}}
    lines: dict[str, list[dict | str]] = {"peft-lora": [line("u1", ["yes"], ["yes"])]}
    return write_run(root, CLASSIFICATION, {"peft-lora": METHODS["peft-lora"], "few-shot": {}}, users, lines)


def flat_rates(plan, seconds: float = 0.01):
    """The same rate for every part ``plan``'s estimate reads: a stand-in for ``budget.measure`` where
    timing the model would take most of a test's time (measuring is tested in test_budget.py)."""
    from tailorlm.bench import budget

    wanted = budget.needs(plan)
    trained = wanted.personal | wanted.adapter
    return budget.Rates(
        load_s=seconds,
        answer_s={budget.answer_key(*answered): seconds for answered in wanted.answers},
        label_s={budget.label_key(r, p): seconds for r in wanted.labels for p in ("answer", "fit")},
        train_s={budget.train_key(part, r): seconds for part in ("personal", "adapter") for r in trained},
        validate_s={r.tag: seconds for r in trained},
        profile_s=seconds,
    )
