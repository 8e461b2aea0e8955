"""Your own per-user data: a CSV, JSONL or Parquet file with one row per (user, input, label or target),
described by a small task file (JSON).

The task file::

    {"name": "tone", "kind": "classification", "instruction": "Is this message rude? ...",
     "labels": ["no", "yes"],                       # optional for classification and multilabel
     "columns": {"user": "annotator", "input": "text", "target": "label",
                 "item": "message_id", "time": "date", "split": "fold"},   # item, time, split optional
     "label_separator": ";"}                        # multilabel only

``kind`` is one of classification, rating (ordered labels, e.g. a 1-5 scale), multilabel or generation.
A rating's labels are its scale in order: numbers order themselves (``labels`` may then be left out), text
labels (a Likert scale) must be listed in their order and are scored as their position 1..K.
Without a split column each user's rows are split per user: chronologically when there is a time column,
otherwise stratified by label with the run's seed (PEFT-U's policy); ``Task.source`` says which. Every
problem is an error naming the file, the row and the column; nothing half-read is returned.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tailorlm import metrics
from tailorlm.data import build, specs
from tailorlm.data.errors import DataError
from tailorlm.data.schema import KINDS, Task, User

SUFFIXES = (".csv", ".jsonl", ".parquet")
ROLES = ("user", "input", "target", "item", "time", "split")
REQUIRED_ROLES = ("user", "input", "target")
SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "dev": "val", "test": "test"}
FAMILY = "table"
# The prompt text around an item and its answer: PEFT-U's, which speaks of a text and a label.
_TEMPLATES_FROM = "peftu"


def is_table(path: str | Path) -> bool:
    return Path(path).suffix.lower() in SUFFIXES


def read_task_file(path: Path) -> specs.TaskSpec:
    """The task file as a ``TaskSpec`` (family ``table``), its column names in ``options``."""
    raw = _json_object(path)
    name = _text(raw, "name", path, default=path.stem)
    kind = _text(raw, "kind", path)
    if kind not in KINDS:
        raise DataError(f"must be one of {', '.join(KINDS)}, not {kind!r}", path, field="kind")
    instruction = _text(raw, "instruction", path)
    labels = raw.get("labels")
    if labels is not None and (
        not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels)
    ):
        raise DataError("must be a list of non-empty strings", path, field="labels")
    if labels is not None and len(set(labels)) != len(labels):
        twice = next(label for label in labels if labels.count(label) > 1)
        raise DataError(f"{twice!r} is listed twice", path, field="labels")
    if labels is not None and len(labels) < 2:
        raise DataError(
            f"lists one label ({labels[0]!r}): a task's answers need at least two", path, field="labels"
        )
    if kind == "rating" and labels is not None:
        _check_rating_order(labels, path)
    if kind == "generation" and labels is not None:
        raise DataError("a generation task has no labels", path, field="labels")
    columns = raw.get("columns", {})
    if not isinstance(columns, Mapping) or not all(isinstance(v, str) and v for v in columns.values()):
        raise DataError("must map roles to column names", path, field="columns")
    unknown = sorted(set(columns) - set(ROLES))
    if unknown:
        raise DataError(f"unknown roles {unknown}; the roles are {', '.join(ROLES)}", path, field="columns")
    separator = raw.get("label_separator", ";")
    template_spec = specs.spec(_example_task(_TEMPLATES_FROM))
    return specs.TaskSpec(
        name=f"{FAMILY}:{name}",
        family=FAMILY,
        key=name,
        kind=kind,
        labels=tuple(labels) if labels is not None else None,
        metrics=_metrics(kind),
        description=str(raw.get("description", f"your own data, described by {path.name}")),
        instruction=instruction,
        templates=template_spec.templates,
        options={
            "columns": {role: columns.get(role, role) for role in ROLES},
            "given": sorted(columns),
            "label_separator": separator,
        },
        needs_data=True,
    )


def load(spec: specs.TaskSpec, path: Path, seed: int = 0) -> Task:
    """Read ``path`` as ``spec`` describes it: one user per distinct user value, their rows split."""
    rows = _read_rows(path)
    columns = _columns(spec, rows[0].keys() if rows else (), path)
    labels = spec.labels
    per_user: dict[str, list[build.Record]] = defaultdict(list)
    splits_of: dict[str, list[str]] = defaultdict(list)
    seen: set[tuple[str, str]] = set()
    for number, row in enumerate(rows, start=1):
        where = f"row {number}"
        user = _cell(row, columns["user"], path, where)
        text = _cell(row, columns["input"], path, where)
        targets = _targets(spec, _cell(row, columns["target"], path, where), path, where, columns["target"])
        item = _cell(row, columns["item"], path, where) if columns["item"] else None
        key = item if item is not None else str(number)
        if (user, key) in seen:
            raise DataError(f"user {user!r} has item {key!r} twice", path, where, columns["item"])
        seen.add((user, key))
        time = _time(row, columns["time"], path, where) if columns["time"] else None
        per_user[user].append(build.Record(key, text, targets, item_key=item, time=time))
        if columns["split"]:
            splits_of[user].append(_split(row, columns["split"], path, where))
    if not per_user:
        raise DataError("has no rows", path)
    if labels is None and spec.kind != "generation":
        found = {t for records in per_user.values() for r in records for t in r.targets}
        if len(found) < 2:  # every method would score 1.0, and nothing about the users could be measured
            raise DataError(
                f"every answer in column {columns['target']!r} is {next(iter(found))!r}: a task needs at "
                'least two labels (list them in the task file as "labels" if the data lacks some)',
                path,
            )
        labels = build.rating_labels(found, path) if spec.kind == "rating" else tuple(sorted(found))
    users = _users(spec, per_user, splits_of, columns, seed)
    if not users:
        raise DataError(f"no user has the {build.splits.MIN_ITEMS} rows a per-user split needs", path)
    source = _source(path, columns, seed)
    if spec.kind == "rating":
        source += f"; {build.rating_note(labels)}"
    return build.task(spec, users, source, chronological=bool(columns["time"]), labels=labels)


# ---- the order of a rating task's labels -----------------------------------------------------------------
# A rating's labels are scored by their place on the scale (metrics.rating_scale: numbers as themselves, text
# as its position in the order listed), and baselines and median decoding read that order too. Numbers
# order themselves; text labels ("very inaccurate" ... "very accurate") must be listed in the task file,
# since no order can be read from words (build.rating_labels). An unclear order is an error when the files
# load, before any training.


def _check_rating_order(labels: Sequence[str], path: Path) -> None:
    """Numeric labels listed out of numeric order would be scored by their numbers but ranked by their
    place in the list: refused."""
    if metrics.rating_values(labels) is not None:
        return
    numbers = [float(label) for label in labels]
    if numbers not in (sorted(numbers), sorted(numbers, reverse=True)):
        raise DataError(
            f"the labels of a rating task are its scale in order; {list(labels)} are numbers out of order: "
            f"list them as {sorted(labels, key=float)}",
            path,
            field="labels",
        )


# ---- reading -------------------------------------------------------------------------------------------


# What a spreadsheet may save a "CSV" with besides commas: read with it when the header holds it and no comma.
OTHER_SEPARATORS = (";", "\t", "|")


def _read_csv(path: Path) -> Any:
    """A CSV file as a frame of strings: UTF-8 (with or without a byte-order mark) or UTF-16 with one (as
    some spreadsheets save), separated by commas, or by one of ``OTHER_SEPARATORS`` when the header is one
    column holding it. Other encodings are an error naming the fix."""
    import pandas as pd

    with path.open("rb") as handle:
        start = handle.read(2)
    encoding = "utf-16" if start in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding=encoding)
        if len(frame.columns) == 1:
            header = str(frame.columns[0])
            separator = next((s for s in OTHER_SEPARATORS if s in header), None)
            if separator is not None:
                frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding=encoding, sep=separator)
    except UnicodeDecodeError as error:
        raise DataError(
            f"is not UTF-8 text (byte {error.start} cannot be read): save it as UTF-8, e.g. a spreadsheet's "
            "'CSV UTF-8'",
            path,
        ) from None
    return frame


def _read_rows(path: Path) -> list[dict[str, Any]]:
    import pandas as pd

    if not path.is_file():
        raise DataError("does not exist", path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            frame = _read_csv(path)
        elif suffix == ".jsonl":
            frame = pd.read_json(path, lines=True, dtype=False)
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            raise DataError(f"is not a table: use one of {', '.join(SUFFIXES)}", path)
    except (ValueError, OSError, ImportError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"cannot be read as {suffix[1:].upper()}: {error}", path) from None
    return frame.to_dict("records")


def _columns(spec: specs.TaskSpec, present: Sequence[str], path: Path) -> dict[str, str | None]:
    """Role -> column; an optional role whose column was not named and is absent is None."""
    named = spec.options["columns"]
    given = set(spec.options["given"])
    found: dict[str, str | None] = {}
    for role in ROLES:
        column = named[role]
        if column in present:
            found[role] = column
        elif role in REQUIRED_ROLES or role in given:
            raise DataError(
                f"no such column; the file has {', '.join(map(str, present)) or 'none'}", path, field=column
            )
        else:
            found[role] = None
    return found


def _cell(row: Mapping[str, Any], column: str, path: Path, where: str) -> str:
    value = row.get(column)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise DataError("is empty", path, where, column)
    text = str(value).strip()
    if not text:
        raise DataError("is empty", path, where, column)
    return text


def _targets(spec: specs.TaskSpec, value: str, path: Path, where: str, column: str) -> tuple[str, ...]:
    if spec.kind == "multilabel":
        targets = tuple(t.strip() for t in value.split(spec.options["label_separator"]) if t.strip())
    else:
        targets = (value,)
    if spec.labels is not None:
        unknown = [t for t in targets if t not in spec.labels]
        if unknown:
            raise DataError(
                f"{unknown[0]!r} is not one of the labels {list(spec.labels)}", path, where, column
            )
    return targets


def _time(row: Mapping[str, Any], column: str, path: Path, where: str) -> float:
    import pandas as pd

    value = _cell(row, column, path, where)
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return pd.Timestamp(value).timestamp()
    except (ValueError, TypeError):
        raise DataError(f"{value!r} is neither a number nor a date", path, where, column) from None


def _split(row: Mapping[str, Any], column: str, path: Path, where: str) -> str:
    value = _cell(row, column, path, where).lower()
    if value not in SPLIT_NAMES:
        raise DataError(f"{value!r} is not one of {', '.join(SPLIT_NAMES)}", path, where, column)
    return SPLIT_NAMES[value]


# ---- users and splits ------------------------------------------------------------------------------------


def _users(
    spec: specs.TaskSpec,
    per_user: Mapping[str, list[build.Record]],
    splits_of: Mapping[str, list[str]],
    columns: Mapping[str, str | None],
    seed: int,
) -> list[User]:
    users = []
    for user_id in sorted(per_user, key=build.natural_key):
        records = per_user[user_id]
        if columns["split"]:
            parts = {name: [] for name in ("train", "val", "test")}
            for record, split in zip(records, splits_of[user_id], strict=True):
                parts[split].append(record)
            user = build.subjective_user(spec, user_id, (parts["train"], parts["val"], parts["test"]))
        elif columns["time"]:
            user = build.timeline_user(spec, user_id, records)
        else:
            user = build.stratified_user(spec, user_id, records, seed, None)
        if user is not None:
            users.append(user)
    return users


def _source(path: Path, columns: Mapping[str, str | None], seed: int) -> str:
    if columns["split"]:
        how = f"splits from column {columns['split']!r}"
    elif columns["time"]:
        how = f"per user, chronological by column {columns['time']!r}"
    else:
        how = f"per user, 80/10/10 stratified by label, seed {seed}"
    return f"{path} ({how})"


# ---- the task file --------------------------------------------------------------------------------------


def _json_object(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise DataError("does not exist", path)
    try:
        raw = json.loads(path.read_text("utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise DataError(f"is not valid JSON: {error}", path) from None
    if not isinstance(raw, Mapping):
        raise DataError("must be a JSON object", path)
    return raw


def _text(raw: Mapping[str, Any], field: str, path: Path, default: str | None = None) -> str:
    value = raw.get(field, default)
    if not isinstance(value, str) or not value.strip():
        raise DataError("missing" if field not in raw else "must be a non-empty string", path, field=field)
    return value


def _metrics(kind: str) -> tuple[str, ...]:
    """The metrics the bundled tasks of this kind are scored with."""
    return specs.spec(_example_task(kind)).metrics


def _example_task(kind_or_family: str) -> str:
    from tailorlm.data import available_tasks

    for name in available_tasks():
        spec = specs.spec(name)
        if kind_or_family in (spec.kind, spec.family):
            return name
    raise DataError(f"no bundled task of kind {kind_or_family!r} to take metrics from")
