"""Turning a task's example into the user message a model sees, and into the text retrieval searches with.

Two layouts, both driven by the templates in the task's JSON file:

- PEFT-U and the offline tasks: profile, instruction, retrieved history, few-shot blocks ``Text: ... Label:
  ...``, then the query block, one per line.
- LaMP: the retrieved profile items are written into the question itself, each per the task's template
  (``the tag for the movie: "{description}" is "{tag}"``), joined with ", and ", as LaMP's own prompt code
  does; a generated profile goes first, as OPPU puts it.

The caller applies the model's chat template; this module only builds the text.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tailorlm.data.schema import Example, HistoryItem, Task
from tailorlm.data.specs import TaskSpec

_FORMATTER = string.Formatter()


def fill(template: str, values: Mapping[str, Any], where: str = "template") -> str:
    """``template.format_map(values)`` with an error that says which field the template wanted."""
    try:
        return _FORMATTER.vformat(template, (), values)
    except KeyError as missing:
        raise KeyError(f"{where} {template!r} needs field {missing.args[0]!r}") from None


def document(spec: TaskSpec, values: Mapping[str, Any]) -> str:
    """How an item reads as a retrieval document (the task's ``document`` template)."""
    return fill(spec.options.get("document") or spec.template("document"), values, f"{spec.name} document")


def query(task: Task, example: Example) -> str:
    """The text to retrieve with: for LaMP the part of the input after the task's marker (LaMP's own
    rule), for every other task the plain input."""
    rule = task.spec.options.get("query")
    if not rule:
        return example.text
    if rule["method"] == "quotes":
        return _between_quotes(example.text, rule["take"])
    return _after_marker(example.text, rule["marker"])


def content_free(task: Task, example: Example) -> Example:
    """``example`` with its content replaced by the task's content-free filler (``N/A``) and the task's
    own wording kept: the input contextual calibration (Zhao et al., 2021) measures the label prior on.
    For LaMP the question's fixed wording stays and only the part retrieval would search with goes."""
    filler = task.spec.template("content_free")
    rule = task.spec.options.get("query")
    text = example.text
    if not rule:
        text = filler
    elif rule["method"] == "quotes":
        parts = text.split('"')
        parts[1::2] = [filler] * len(parts[1::2])
        text = '"'.join(parts)
    else:
        at = text.find(rule["marker"])
        text = filler if at == -1 else f"{text[: at + len(rule['marker'])]} {filler}"
    return dataclasses.replace(example, text=text, fields={})


def _after_marker(text: str, marker: str) -> str:
    at = text.find(marker)
    return text.strip() if at == -1 else text[at + len(marker) :].strip()


def _between_quotes(text: str, take: Sequence[int]) -> str:
    parts = text.split('"')
    # An odd number of quote marks leaves the last string unclosed; LaMP's scanner never emits it.
    quoted = parts[1::2] if len(parts) % 2 == 1 else parts[1:-1:2]
    if len(quoted) <= max(take):
        return text.strip()
    return " ".join(quoted[i] for i in take)


def prompt(
    task: Task,
    example: Example,
    shots: Iterable[Example] = (),
    retrieved: Iterable[HistoryItem] = (),
    profile: str | None = None,
    budget_words: int | None = None,
) -> str:
    """The user-message text for ``example``.

    ``shots`` are labelled examples shown before the query; ``retrieved`` are history items (from
    ``task.history_for``); ``profile`` is a short text about the user. Showing the asked example itself as a
    shot or retrieved item is refused: PEFT-U's own code let that happen. ``budget_words`` caps the words
    of retrieved LaMP items, split among them the way LaMP splits its token budget.
    """
    shots = list(shots)
    retrieved = list(retrieved)
    _refuse_self(example, shots, retrieved)
    if task.spec.family == "lamp":
        return _lamp_prompt(task.spec, example, shots, retrieved, profile, budget_words)
    return _block_prompt(task.spec, example, shots, retrieved, profile)


def _refuse_self(example: Example, shots: list[Example], retrieved: list[HistoryItem]) -> None:
    own = {example.id, example.source_id} - {None}
    for shot in shots:
        same_item = example.item_key is not None and shot.item_key == example.item_key
        if shot.id in own or same_item:
            raise ValueError(f"shot {shot.id} is the example being asked ({example.id})")
    for item in retrieved:
        if item.id in own:
            raise ValueError(f"retrieved item {item.id} is the example being asked ({example.id})")


def _item_values(item: HistoryItem) -> dict[str, Any]:
    return {**item.fields, "document": item.text}


def _block_prompt(
    spec: TaskSpec, example: Example, shots: list[Example], retrieved: list[HistoryItem], profile: str | None
) -> str:
    blocks: list[str] = []
    if profile:
        blocks.append(fill(spec.template("profile"), {"profile": profile}))
    if spec.instruction:
        blocks.append(spec.instruction)
    if retrieved:
        lines = [fill(spec.template("retrieved_item"), _item_values(item)) for item in retrieved]
        blocks.append("\n".join([spec.template("retrieved_header"), *lines]))
    blocks.extend(fill(spec.template("shot"), {"text": s.text, "target": s.target}) for s in shots)
    blocks.append(fill(spec.template("query"), {"text": example.text}))
    return "\n".join(blocks)


def _lamp_prompt(
    spec: TaskSpec,
    example: Example,
    shots: list[Example],
    retrieved: list[HistoryItem],
    profile: str | None,
    budget_words: int | None,
) -> str:
    text = example.text
    if retrieved:
        text = _with_items(spec, text, _lamp_items(spec, retrieved, budget_words))
    if shots:
        text = "\n".join(
            [*(fill(spec.template("shot"), {"text": s.text, "target": s.target}) for s in shots), text]
        )
    if profile:
        text = fill(spec.template("profile"), {"profile": profile}) + "\n" + text
    return text


def _lamp_items(spec: TaskSpec, retrieved: list[HistoryItem], budget_words: int | None) -> list[str]:
    field = spec.options["truncate_field"]
    per_item = None if budget_words is None else max(1, budget_words // len(retrieved))
    saved = 0
    rendered = []
    for item in retrieved:
        values = _item_values(item)
        if per_item is not None:
            words = str(values.get(field, "")).split()
            kept = words[: per_item + saved]
            # Unused words of a short item go to the next ones, as LaMP carries unused tokens over.
            saved += per_item - len(kept)
            values[field] = " ".join(kept)
        rendered.append(fill(spec.options["retrieved_item"], values, f"{spec.name} retrieved item"))
    return rendered


def _with_items(spec: TaskSpec, text: str, items: list[str]) -> str:
    joined = spec.template("item_joiner").join(items)
    anchor = spec.options.get("insert_after")
    if anchor:
        # LaMP-1 writes the author's titles right after the word "title" in the question.
        at = text.find(anchor)
        if at == -1:
            return text
        cut = at + len(anchor)
        return f"{text[:cut]}{spec.template('item_joiner')}{joined}{text[cut:]}"
    return fill(spec.options["combine"], {"items": joined, "input": text})
