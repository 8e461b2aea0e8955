"""Files for measuring the quick profile's work estimate at scale, made at run time from text on this
machine (the Python standard library's docstrings), never committed: an own-data CSV of users x items
with six ordered labels, and a LaMP-5-style folder (``dev_questions.json``, ``dev_outputs.json``) of
users with a profile of papers each. The commands are in docs/benchmark-results.md. Made for timing
only: the LaMP-5 folder's titles, abstracts and golds are drawn at random from one shared pool, so they
carry no per-user signal and measure no personalization.

    python tests/bench/estimate_data.py own OUT_DIR --users 200 --items 135
    python tests/bench/estimate_data.py lamp5 OUT_DIR --users 136
"""

from __future__ import annotations

import argparse
import json
import pydoc
import random
import re
from pathlib import Path

LIKERT6 = [
    "strongly disagree",
    "disagree",
    "slightly disagree",
    "slightly agree",
    "agree",
    "strongly agree",
]
MODULES = ("json", "random", "re", "pathlib", "argparse", "collections", "functools", "itertools", "os")
MODULES += ("string", "textwrap", "datetime", "decimal", "fractions", "statistics", "csv", "email", "http")


def sentences() -> list[str]:
    """English sentences from the standard library's docstrings (20-300 characters each)."""
    found: list[str] = []
    for name in MODULES:
        text = pydoc.render_doc(name, renderer=pydoc.plaintext)
        for part in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            if 20 <= len(part) <= 300 and part[0].isupper() and "|" not in part:
                found.append(part)
    return sorted(set(found))


def write_own(folder: Path, users: int, items: int, seed: int = 0) -> tuple[Path, Path]:
    """``users`` x ``items`` answers on a six-point agreement scale (each user leaning their own way,
    each item its own way) and its task file; returns (task file, data file)."""
    rng = random.Random(seed)
    pool = sentences()
    statements = rng.sample(pool, items)
    lean = [rng.gauss(0, 1) for _ in range(users)]
    pull = [rng.gauss(0, 1) for _ in range(items)]
    rows = ["annotator,text,answer,statement_id"]
    for user in range(users):
        for item, statement in enumerate(statements):
            score = 2.5 + lean[user] + pull[item] + rng.gauss(0, 0.8)
            label = LIKERT6[min(5, max(0, round(score)))]
            rows.append(f'p{user},"{statement.replace(chr(34), chr(39))}",{label},s{item}')
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "answers.csv"
    data.write_text("\n".join(rows) + "\n")
    task = {
        "name": "agree6",
        "kind": "rating",
        "instruction": "How much does this person agree with the statement?",
        "labels": LIKERT6,
        "columns": {"user": "annotator", "input": "text", "target": "answer", "item": "statement_id"},
    }
    task_file = folder / "task.json"
    task_file.write_text(json.dumps(task))
    return task_file, data


def _abstract(rng: random.Random, pool: list[str]) -> str:
    """About 150-220 words, the length of a LaMP-5 abstract."""
    words: list[str] = []
    target = rng.randint(150, 220)
    while len(words) < target:
        words += rng.choice(pool).split()
    return " ".join(words[:target])


def write_lamp5(folder: Path, users: int, seed: int = 0) -> Path:
    """A user-based LaMP-5 dev split: one question per user, each with a profile of 30-150 dated
    papers (LaMP-5's profiles average about 90)."""
    rng = random.Random(seed)
    pool = sentences()
    questions, golds = [], []
    for user in range(users):
        profile = []
        for index in range(rng.randint(30, 150)):
            title = " ".join(rng.choice(pool).split()[: rng.randint(5, 12)])
            date = f"{2000 + index // 12}-{index % 12 + 1:02d}-01"
            profile.append(
                {"id": f"{user}-{index}", "title": title, "abstract": _abstract(rng, pool), "date": date}
            )
        qid = str(1000 + user)
        prompt = "Generate a title for the following abstract of a paper: " + _abstract(rng, pool)
        questions.append({"id": qid, "input": prompt, "profile": profile})
        golds.append({"id": qid, "output": " ".join(rng.choice(pool).split()[:8])})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dev_questions.json").write_text(json.dumps(questions))
    (folder / "dev_outputs.json").write_text(json.dumps({"task": "LaMP_5", "golds": golds}))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["own", "lamp5"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--items", type=int, default=135)
    args = parser.parse_args()
    if args.kind == "own":
        print(*write_own(args.out, args.users, args.items))
    else:
        print(write_lamp5(args.out, args.users))


if __name__ == "__main__":
    main()
