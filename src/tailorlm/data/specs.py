"""Task specifications read from the JSON files under ``tailorlm/resources/tasks/`` (one per family).

Instructions, label sets and prompt templates are data, not code: changing a prompt is an edit to a JSON
file, and every task of a family shares the family's templates unless it overrides them.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

from tailorlm.data.errors import UnknownTaskError
from tailorlm.data.schema import KINDS, Kind

# The sources a task's data comes from, one JSON file each; not the method families of tailorlm.bench.
SOURCE_FAMILIES: tuple[str, ...] = ("offline", "peftu", "lamp")
# Offline tasks are named bare ("verbagg"); the others carry their family ("peftu:hatexplain", "lamp:2").
_BARE_FAMILY = "offline"
_RESERVED = {"kind", "labels", "metrics", "description", "instruction", "templates"}


@dataclass(frozen=True)
class TaskSpec:
    """Everything known about a task before any data is read."""

    name: str
    family: str
    key: str
    kind: Kind
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    description: str
    instruction: str = ""
    templates: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    needs_data: bool = False

    def template(self, name: str) -> str:
        try:
            return self.templates[name]
        except KeyError:
            raise KeyError(f"task {self.name} has no {name!r} template") from None

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-ready data (``from_dict`` reads it back): what a store keeps of a task that is
        not bundled (your own task file), so the store does not depend on the file staying where it was."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TaskSpec:
        values = dict(values)
        for name in ("labels", "metrics"):
            if values.get(name) is not None:
                values[name] = tuple(values[name])
        return cls(**values)


def _resource_text(family: str) -> str:
    return resources.files("tailorlm").joinpath("resources", "tasks", f"{family}.json").read_text("utf-8")


@functools.cache
def family_document(family: str) -> Mapping[str, Any]:
    """The parsed JSON of one family (cached: the files are part of the installed package)."""
    return json.loads(_resource_text(family))


def _full_name(family: str, key: str) -> str:
    return key if family == _BARE_FAMILY else f"{family}:{key}"


def _build(family: str, key: str, raw: Mapping[str, Any], document: Mapping[str, Any]) -> TaskSpec:
    kind = raw["kind"]
    if kind not in KINDS:
        raise ValueError(f"task {family}:{key} in {family}.json has unknown kind {kind!r}")
    labels = raw.get("labels")
    return TaskSpec(
        name=_full_name(family, key),
        family=family,
        key=key,
        kind=kind,
        labels=tuple(labels) if labels is not None else None,
        metrics=tuple(raw["metrics"]),
        description=raw.get("description", ""),
        instruction=raw.get("instruction", ""),
        templates={**document.get("templates", {}), **raw.get("templates", {})},
        options={k: v for k, v in raw.items() if k not in _RESERVED},
        needs_data=bool(document.get("needs_data", False)),
    )


@functools.cache
def all_specs() -> dict[str, TaskSpec]:
    """Every known task by full name, in a fixed order (offline, PEFT-U, LaMP)."""
    specs: dict[str, TaskSpec] = {}
    for family in SOURCE_FAMILIES:
        document = family_document(family)
        for key, raw in document["tasks"].items():
            spec = _build(family, key, raw, document)
            specs[spec.name] = spec
    return specs


def spec(name: str) -> TaskSpec:
    """The spec of a task by its full name; a near miss gets the list of names, never a silent fallback."""
    specs = all_specs()
    normalized = name.strip().lower()
    if normalized in specs:
        return specs[normalized]
    for full, candidate in specs.items():
        if full.lower() == normalized:
            return candidate
    raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(specs)}")
