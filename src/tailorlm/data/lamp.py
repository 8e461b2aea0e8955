"""LaMP files: ``{split}_questions.json`` and ``{split}_outputs.json``, and predictions in the outputs format.

- questions: ``[{"id", "input", "profile": [{"id", ...task fields, "date"?}], "user_id"?}]``. In the
  user-based form every question is its own user; in the time-based form questions carry ``user_id``
  and are grouped by it.
- outputs: ``{"task": "LaMP_k", "golds": [{"id", "output"}]}``; predictions use the same shape, so
  LaMP's own evaluation script accepts what ``write_predictions`` writes.

A loaded LaMP task puts the questions of the split in each user's ``test`` and the user's profile in
``history``; ``train`` holds the profile items turned into task examples with the task's template (what
OPPU trains a user's module on). A question may only see its own profile.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tailorlm import metrics
from tailorlm.data import build, render
from tailorlm.data.errors import DataError, UnknownTaskError
from tailorlm.data.schema import Example, HistoryItem, Task, User
from tailorlm.data.specs import TaskSpec, all_specs

SPLITS: tuple[str, ...] = ("train", "dev", "test")
DEFAULT_SPLIT = "dev"


@dataclass(frozen=True)
class Question:
    id: str
    input: str
    user_id: str
    profile: tuple[HistoryItem, ...]


# --- reading --------------------------------------------------------------------------------------------


def _text_id(value: Any, path: Path, record: str, field: str = "id") -> str:
    # bool is an int subclass, and a true/false id is a mistake, never an id.
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise DataError(
            f"must be a string, got {type(value).__name__}", file=path, record=record, field=field
        )
    return str(value)


def _field_text(value: Any, path: Path, record: str, field: str) -> str:
    """A profile or output field as text; numbers are allowed where LaMP writes them (scores, dates)."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return str(int(value)) if float(value).is_integer() else str(value)
    raise DataError(f"must be a string, got {type(value).__name__}", file=path, record=record, field=field)


def parse_date(value: Any, path: Path, record: str) -> float:
    """LaMP dates ("2019-05-01", "2019", 2019, or ISO with a time) as seconds since 1970 (UTC)."""
    text = _field_text(value, path, record, "date").strip()
    try:
        parts = [int(p) for p in text.split("-")]
        if 1 <= len(parts) <= 3:
            year, month, day = (*parts, 1, 1)[:3]
            return dt.datetime(year, month, day, tzinfo=dt.UTC).timestamp()
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        raise DataError(f"cannot read {text!r} as a date", file=path, record=record, field="date") from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)).timestamp()


def _profile_item(spec: TaskSpec, raw: Any, path: Path, record: str) -> HistoryItem:
    if not isinstance(raw, Mapping):
        raise DataError(
            f"must be an object, got {type(raw).__name__}", file=path, record=record, field="profile"
        )
    if "id" not in raw:
        raise DataError("missing", file=path, record=record, field="profile[].id")
    pid = _text_id(raw["id"], path, record, "profile[].id")
    where = f"{record} / profile item {pid}"
    fields: dict[str, str] = {}
    for name in spec.options["profile_fields"]:
        if name not in raw:
            raise DataError("missing" + _variant_hint(spec, raw), file=path, record=where, field=name)
        fields[name] = _field_text(raw[name], path, where, name)
    time = parse_date(raw["date"], path, where) if raw.get("date") is not None else None
    if time is not None:
        fields["date"] = _field_text(raw["date"], path, where, "date")
    return HistoryItem(id=pid, text=render.document(spec, fields), fields=fields, time=time)


def _variant_hint(spec: TaskSpec, raw: Mapping[str, Any]) -> str:
    if spec.key == "2" and "category" in raw:
        return " (this profile has categories: it is the older news variant, load it as lamp:2-news)"
    if spec.key == "2-news" and "tag" in raw:
        return " (this profile has movie tags: load it as lamp:2)"
    return ""


def _question(spec: TaskSpec, raw: Any, path: Path, index: int, time_based: bool) -> Question:
    if not isinstance(raw, Mapping):
        raise DataError(f"must be an object, got {type(raw).__name__}", file=path, record=f"#{index}")
    if "id" not in raw:
        raise DataError("missing", file=path, record=f"#{index}", field="id")
    qid = _text_id(raw["id"], path, f"#{index}")
    record = f"question {qid}"
    if not isinstance(raw.get("input"), str):
        problem = "missing" if "input" not in raw else "must be a string"
        raise DataError(problem, file=path, record=record, field="input")
    if not isinstance(raw.get("profile"), list):
        problem = "missing" if "profile" not in raw else "must be a list of profile items"
        raise DataError(problem, file=path, record=record, field="profile")
    if time_based != ("user_id" in raw):
        raise DataError(
            "some questions carry a user_id and others do not", file=path, record=record, field="user_id"
        )
    user_id = _text_id(raw["user_id"], path, record, "user_id") if time_based else qid
    profile = tuple(_profile_item(spec, item, path, record) for item in raw["profile"])
    return Question(id=qid, input=raw["input"], user_id=user_id, profile=profile)


def read_questions(spec: TaskSpec, path: Path) -> list[Question]:
    raw = build.read_json(path)
    if not isinstance(raw, list):
        raise DataError(f"top level must be a list of questions, got {type(raw).__name__}", file=path)
    if not raw:
        raise DataError("no questions", file=path)
    time_based = isinstance(raw[0], Mapping) and "user_id" in raw[0]
    questions = [_question(spec, item, path, i, time_based) for i, item in enumerate(raw)]
    _unique([q.id for q in questions], path, "id")
    return questions


def _unique(ids: Sequence[str], path: Path, field: str) -> None:
    seen: set[str] = set()
    for value in ids:
        if value in seen:
            raise DataError("appears more than once", file=path, record=f"id {value}", field=field)
        seen.add(value)


def read_outputs(path: Path) -> tuple[str, list[tuple[str, str]]]:
    """The task id and the ``(id, output)`` pairs of an outputs (golds or predictions) file."""
    raw = build.read_json(path)
    if not isinstance(raw, Mapping):
        raise DataError('top level must be an object {"task": ..., "golds": [...]}', file=path)
    if not isinstance(raw.get("task"), str):
        raise DataError("missing" if "task" not in raw else "must be a string", file=path, field="task")
    if not isinstance(raw.get("golds"), list):
        raise DataError("missing" if "golds" not in raw else "must be a list", file=path, field="golds")
    pairs = []
    for index, item in enumerate(raw["golds"]):
        if not isinstance(item, Mapping):
            raise DataError("must be an object with id and output", file=path, record=f"golds #{index}")
        for name in ("id", "output"):
            if name not in item:
                raise DataError("missing", file=path, record=f"golds #{index}", field=name)
        oid = _text_id(item["id"], path, f"golds #{index}")
        pairs.append((oid, _field_text(item["output"], path, f"id {oid}", "output")))
    _unique([oid for oid, _ in pairs], path, "id")
    return raw["task"], pairs


def check_same_ids(expected: Sequence[str], got: Sequence[str], path: Path, what: str) -> None:
    """LaMP refuses a file whose ids differ from the golds; say which ids, not just that they differ."""
    missing = sorted(set(expected) - set(got), key=build.natural_key)
    extra = sorted(set(got) - set(expected), key=build.natural_key)
    if missing or extra:
        parts = []
        if missing:
            parts.append(
                f"missing {len(missing)} ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
            )
        if extra:
            parts.append(
                f"unexpected {len(extra)} ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})"
            )
        raise DataError(f"ids of {what} differ from the golds: {'; '.join(parts)}", file=path, field="id")


# --- task identity --------------------------------------------------------------------------------------


def _accepted_ids(spec: TaskSpec) -> set[str]:
    return {spec.options["lamp_id"], *spec.options.get("aliases", ())}


def spec_for_outputs(task_id: str, golds: Sequence[str], path: Path) -> TaskSpec:
    """The spec a golds file is for. ``LaMP_2`` names both the movie-tag task and the older news task (LaMP's
    own script has used both label sets), so the golds decide; OPPU's ``LaMP_2M`` / ``LaMP_2N`` say it."""
    candidates = [s for s in all_specs().values() if s.family == "lamp" and task_id in _accepted_ids(s)]
    if not candidates:
        known = sorted({i for s in all_specs().values() if s.family == "lamp" for i in _accepted_ids(s)})
        raise DataError(
            f"unknown LaMP task {task_id!r}; expected one of {', '.join(known)}", file=path, field="task"
        )
    for candidate in candidates:
        if candidate.labels is None or all(g.strip() in candidate.labels for g in golds):
            return candidate
    labels = candidates[0].labels or ()
    bad = next(g for g in golds if g.strip() not in labels)
    raise DataError(f"gold {bad!r} is not a label of {task_id}", file=path, field="output")


# --- building the task ------------------------------------------------------------------------------------


def find_files(data_dir: Path, split: str) -> tuple[Path, Path]:
    if split not in SPLITS:
        raise UnknownTaskError(f"LaMP has no split {split!r}; use one of {', '.join(SPLITS)}")
    for folder in (data_dir, data_dir / split):
        questions = folder / f"{split}_questions.json"
        if questions.is_file():
            return questions, folder / f"{split}_outputs.json"
    raise DataError(f"no {split}_questions.json here or in its {split}/ subfolder", file=data_dir)


def _merged_profile(questions: Sequence[Question], path: Path) -> list[HistoryItem]:
    """All profile items of one user, in time order when every item is dated, else in file order."""
    by_id: dict[str, HistoryItem] = {}
    for question in questions:
        for item in question.profile:
            known = by_id.setdefault(item.id, item)
            if known.fields != item.fields:
                raise DataError(
                    "the same profile item differs between questions",
                    path,
                    f"question {question.id}",
                    "profile",
                )
    items = list(by_id.values())
    if all(item.time is not None for item in items):
        return sorted(items, key=lambda item: (item.time, build.natural_key(item.id)))
    return items


def _profile_examples(spec: TaskSpec, user_id: str, history: list[HistoryItem], shared: set[str], path: Path):
    """The user's profile items as task examples (OPPU's per-user training data). Only items every one of
    the user's questions may see are used, so nothing one question must not see is trained on."""
    template = spec.options["profile_example"]
    examples = []
    for position, item in enumerate(history):
        if item.id not in shared:
            continue
        target = render.fill(template["target"], item.fields)
        if spec.labels is not None and template.get("target_is_label", True):
            build.check_labels(
                [target], spec.labels, path, f"user {user_id} / profile item {item.id}", "profile"
            )
        examples.append(
            Example(
                id=f"{user_id}/profile/{item.id}",
                text=render.fill(template["input"], item.fields),
                target=target,
                targets=(target,),
                time=item.time,
                fields=item.fields,
                source_id=item.id,
                visible_before=position,
            )
        )
    return examples


def _user(
    spec: TaskSpec, user_id: str, questions: list[Question], golds: Mapping[str, str], path: Path
) -> User:
    history = _merged_profile(questions, path)
    shared = set.intersection(*({item.id for item in q.profile} for q in questions))
    test = [
        Example(
            id=q.id,
            text=q.input,
            target=golds[q.id],
            targets=(golds[q.id],),
            fields={"user_id": q.user_id},
            visible_ids=frozenset(item.id for item in q.profile),
        )
        for q in questions
    ]
    train = _profile_examples(spec, user_id, history, shared, path)
    return User(id=user_id, train=train, val=[], test=test, history=history)


def _golds(spec: TaskSpec, outputs: Path, questions: list[Question]) -> dict[str, str]:
    task_id, pairs = read_outputs(outputs)
    if task_id not in _accepted_ids(spec):
        raise DataError(
            f"is {task_id!r}, but {spec.name} expects {spec.options['lamp_id']!r}", outputs, None, "task"
        )
    check_same_ids(
        [q.id for q in questions], [oid for oid, _ in pairs], outputs, "the golds and the questions"
    )
    for oid, output in pairs:
        if spec.labels is not None and output.strip() not in spec.labels:
            raise DataError(f"{output!r} is not one of {spec.name}'s labels", outputs, f"id {oid}", "output")
    return {oid: output.strip() for oid, output in pairs}


def load(spec: TaskSpec, data_dir: Path, split: str = DEFAULT_SPLIT) -> Task:
    questions_path, outputs_path = find_files(data_dir, split)
    questions = read_questions(spec, questions_path)
    golds = _golds(spec, outputs_path, questions)
    grouped: dict[str, list[Question]] = {}
    for question in questions:
        grouped.setdefault(question.user_id, []).append(question)
    users = [
        _user(spec, uid, sorted(grouped[uid], key=lambda q: build.natural_key(q.id)), golds, questions_path)
        for uid in sorted(grouped, key=build.natural_key)
    ]
    return build.task(spec, users, str(questions_path), chronological=True)


# --- predictions and scoring ----------------------------------------------------------------------------


def write_predictions(task: Task, predictions: Mapping[str, str], path: Path) -> Path:
    """Write predictions for every question of ``task`` in LaMP's outputs format."""
    ids = [example.id for user in task.users for example in user.test]
    check_same_ids(ids, list(predictions), path, "the predictions")
    payload = {
        "task": task.spec.options["lamp_id"],
        "golds": [{"id": i, "output": str(predictions[i])} for i in ids],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _users_of(questions_path: Path | None, ids: Sequence[str]) -> dict[str, str]:
    """Question id -> user id: from a questions file's ``user_id`` when given, else each question is its own
    user (which is exactly LaMP's user-based form)."""
    if questions_path is None:
        return {i: i for i in ids}
    raw = build.read_json(questions_path)
    if not isinstance(raw, list):
        raise DataError("top level must be a list of questions", file=questions_path)
    users = {}
    for index, item in enumerate(raw):
        if not isinstance(item, Mapping) or "id" not in item:
            raise DataError("missing", file=questions_path, record=f"#{index}", field="id")
        qid = _text_id(item["id"], questions_path, f"#{index}")
        users[qid] = _text_id(item.get("user_id", qid), questions_path, f"question {qid}", "user_id")
    check_same_ids(ids, list(users), questions_path, "the questions")
    return users


def score_files(
    golds_path: Path, preds_path: Path, questions_path: Path | None = None, stemmer: bool = False
) -> dict[str, Any]:
    """Score a LaMP predictions file against a golds file the way LaMP's evaluation does (task read from the
    golds), plus per-user figures and bootstrap intervals."""
    task_id, gold_pairs = read_outputs(golds_path)
    pred_task, pred_pairs = read_outputs(preds_path)
    if pred_task != task_id:
        raise DataError(f"is {pred_task!r} but the golds are {task_id!r}", file=preds_path, field="task")
    gold_ids = [oid for oid, _ in gold_pairs]
    check_same_ids(gold_ids, [oid for oid, _ in pred_pairs], preds_path, "the predictions")
    spec = spec_for_outputs(task_id, [g for _, g in gold_pairs], golds_path)
    if spec.kind == "rating":
        _check_numeric(gold_pairs, golds_path)
    users = _users_of(questions_path, gold_ids)
    preds = dict(pred_pairs)
    result = metrics.score(
        spec.metrics,
        [g for _, g in gold_pairs],
        [preds[i] for i in gold_ids],
        [users[i] for i in gold_ids],
        labels=spec.labels,
        stemmer=stemmer,
    )
    return {"task": task_id, "spec": spec.name, **result}


def _check_numeric(pairs: Sequence[tuple[str, str]], path: Path) -> None:
    for oid, output in pairs:
        try:
            float(output)
        except ValueError:
            raise DataError(
                f"gold {output!r} is not a number", file=path, record=f"id {oid}", field="output"
            ) from None
