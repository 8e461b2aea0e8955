"""Users, tasks and their data: one data model for PEFT-U folders, LaMP files and the offline tasks.

from tailorlm.data import load_task, available_tasks
task = load_task("verbagg", seed=0)                  # installed with the package's dependencies
task = load_task("peftu:hatexplain", data_dir=DIR)   # a PEFT-U folder with user_data_leaked.json
task = load_task("lamp:2", data_dir=DIR, split="dev")

The task specs (``tailorlm.data.specs``, read from ``tailorlm/resources/tasks/*.json``) and the text built
from their templates (``tailorlm.data.render``: prompts, retrieval documents and queries) live here too.
"""

from __future__ import annotations

from pathlib import Path

# Imports within this package run one way, never back: errors, schema -> specs -> render -> splits, build
# -> the loaders (offline, peftu, lamp) -> this file. That is why every module can import what it needs at
# the top and any of them can be imported first; tests/test_import_graph.py keeps other packages out.
from tailorlm.data import build, lamp, offline, peftu, specs, table
from tailorlm.data.errors import DataError, UnknownTaskError
from tailorlm.data.schema import KINDS, SPLITS, Example, HistoryItem, Kind, Task, User

__all__ = [
    "KINDS",
    "SPLITS",
    "DataError",
    "Example",
    "HistoryItem",
    "Kind",
    "Task",
    "UnknownTaskError",
    "User",
    "available_tasks",
    "load_task",
]


def available_tasks() -> list[str]:
    """Every task name ``load_task`` accepts, offline tasks first."""
    return list(specs.all_specs())


ITEMS_SPLIT = "items"  # a split any task with shared item ids can take: by item, across users


def load_task(name: str, data_dir: str | Path | None = None, split: str | None = None, seed: int = 0) -> Task:
    """Load a task by name.

    ``name`` may also be a task file (JSON, ``data.table``) with ``data_dir`` a CSV / JSONL / Parquet table
    or a PEFT-U-format folder or file of any other task.

    ``data_dir`` is needed for PEFT-U (a task folder, a folder of task folders, or the JSON file) and LaMP
    (the folder with ``{split}_questions.json`` and ``{split}_outputs.json``). ``split`` picks LaMP's
    train / dev (default) / test files, or PEFT-U's leaked (default) / no_leak file; the offline tasks and
    tables make their own splits from ``seed``, per user, or with ``split`` "items" by item
    (``build.hold_out_items``: test items no training answer is about).
    """
    if split == ITEMS_SPLIT:
        family = None if name.lower().endswith(".json") else specs.spec(name).family
        if family in ("lamp", "peftu"):
            raise UnknownTaskError(
                f"{name}: --split items is for the offline tasks and your own tables; {family} files come "
                "with their own splits"
            )
        return build.hold_out_items(load_task(name, data_dir=data_dir, seed=seed), seed)
    if name.lower().endswith(".json"):  # a task file: your own table, or a PEFT-U-format file (data/table.py)
        if data_dir is None:
            raise UnknownTaskError(f"a task file ({name}) describes your data: give it as --data")
        spec = table.read_task_file(Path(name).expanduser())
        data = Path(data_dir).expanduser()
        if not table.is_table(data):
            return peftu.load(spec, data, split)  # PEFT-U's format under this task file's name
        if split is not None:
            raise UnknownTaskError(
                "a table's splits come from its split column or are made per user: no --split"
            )
        return table.load(spec, data, seed)
    spec = specs.spec(name)
    if not spec.needs_data:
        if data_dir is not None or split is not None:
            raise UnknownTaskError(
                f"{spec.name} is read from an installed package: it takes no data folder or split"
            )
        return offline.load(spec, seed)
    if data_dir is None:
        raise UnknownTaskError(
            f"{spec.name} reads your own files: give the folder that holds them (--data DIR)"
        )
    folder = Path(data_dir).expanduser()
    if spec.family == "peftu":
        return peftu.load(spec, folder, split)
    return lamp.load(spec, folder, split or lamp.DEFAULT_SPLIT)
