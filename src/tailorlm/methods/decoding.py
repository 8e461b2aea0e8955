"""Turning prompts into answers: constrained choice among the task's labels by log-likelihood, or free
generation scored later with the reference rules."""

from __future__ import annotations

from collections.abc import Sequence

from tailorlm.data.schema import Task
from tailorlm.engine.core import Engine
from tailorlm.engine.generation import DecodeConfig

DECODINGS = ("choice", "generate")


def default_decoding(task: Task) -> str:
    return "generate" if task.labels is None else "choice"


def check_decoding(task: Task, decoding: str) -> str:
    if decoding not in DECODINGS:
        raise ValueError(f"unknown decoding {decoding!r}; use one of {', '.join(DECODINGS)}")
    if decoding == "choice" and task.labels is None:
        raise ValueError(f"task {task.name} has no label set: it can only be decoded with 'generate'")
    return decoding


def answer(
    engine: Engine,
    task: Task,
    prompts: Sequence[str],
    slots: Sequence[int],
    decoding: str,
    max_new_tokens: int = 24,
    batch_size: int = 16,
) -> list[str]:
    if decoding == "choice":
        return choose(engine, task.labels, prompts, slots, batch_size)
    # One line is one answer in every task's format; stopping there saves most of the decoding time.
    config = DecodeConfig(max_new_tokens=max_new_tokens, stop=("\n",))
    return engine.generate(prompts, slots, config, batch_size=batch_size)


def choose(
    engine: Engine, labels: Sequence[str], prompts: Sequence[str], slots: Sequence[int], batch_size: int = 16
) -> list[str]:
    """The label with the highest summed log-probability (the end-of-turn token included, so a label that
    is a prefix of another is not favoured for being short and unfinished)."""
    scores = engine.score_choices(prompts, slots, labels, batch_size=batch_size)
    return [labels[max(range(len(labels)), key=row.__getitem__)] for row in scores]
