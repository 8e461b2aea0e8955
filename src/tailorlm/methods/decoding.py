"""Turning prompts into answers: the task's label of the highest log-likelihood ("likelihood"), the same
calibrated against the label prior the prompt alone induces, the median of the label distribution
for ordered labels, or free generation scored later with the reference rules."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tailorlm.data.schema import Task, User
from tailorlm.engine.engine import Engine
from tailorlm.engine.generation import DecodeConfig

DECODINGS = ("likelihood", "calibrated", "median", "generate")
LABEL_DECODINGS = ("likelihood", "calibrated", "median")
FORMER_DECODINGS = {"choice": "likelihood"}  # earlier names, still accepted

UserAnswers = tuple[User, list[str], float]  # a user, one answer per test example, seconds spent per user


def default_decoding(task: Task) -> str:
    return "generate" if task.labels is None else "likelihood"


def check_decoding(task: Task, decoding: str) -> str:
    """``decoding`` under its current name, if ``task`` can be decoded that way."""
    decoding = FORMER_DECODINGS.get(decoding, decoding)
    if decoding not in DECODINGS:
        raise ValueError(f"unknown decoding {decoding!r}; use one of {', '.join(DECODINGS)}")
    if decoding in LABEL_DECODINGS and task.labels is None:
        raise ValueError(f"task {task.name} has no label set: it can only be decoded with 'generate'")
    if decoding == "median" and not task.ordinal:
        raise ValueError(
            f"task {task.name}'s labels have no order: 'median' decoding needs ratings or ordered labels"
        )
    return decoding


def answer(
    engine: Engine,
    task: Task,
    prompts: Sequence[str],
    slots: Sequence[int],
    decoding: str,
    max_new_tokens: int = 24,
    batch_size: int = 16,
    content_free: Sequence[str] | None = None,
) -> list[str]:
    """``content_free`` (one per prompt, same context with the query blanked) is needed by ``calibrated``."""
    if decoding == "likelihood":
        return decode_likelihood(engine, task.labels, prompts, slots, batch_size)
    if decoding == "median":
        return decode_median(engine, task.labels, prompts, slots, batch_size)
    if decoding == "calibrated":
        if content_free is None or len(content_free) != len(prompts):
            raise ValueError("calibrated decoding needs one content-free prompt per prompt")
        return decode_calibrated(engine, task.labels, prompts, content_free, slots, batch_size)
    # One line is one answer in every task's format; stopping there saves most of the decoding time.
    config = DecodeConfig(max_new_tokens=max_new_tokens, stop=("\n",))
    return engine.generate(prompts, slots, config, batch_size=batch_size)


def decode_likelihood(
    engine: Engine, labels: Sequence[str], prompts: Sequence[str], slots: Sequence[int], batch_size: int = 16
) -> list[str]:
    """The label with the highest summed log-probability (the end-of-turn token included, so a label that
    is a prefix of another is not favoured for being short and unfinished)."""
    scores = engine.score_labels(prompts, slots, labels, batch_size=batch_size)
    return [labels[max(range(len(labels)), key=row.__getitem__)] for row in scores]


def decode_calibrated(
    engine: Engine,
    labels: Sequence[str],
    prompts: Sequence[str],
    content_free: Sequence[str],
    slots: Sequence[int],
    batch_size: int = 16,
) -> list[str]:
    """Contextual calibration (Zhao et al., 2021): each label's log-probability minus the one it gets when
    the query is blanked and everything else is kept, so a prompt's pull toward one label (a small base
    model answering "yes" to anything) no longer decides the answer. Dividing by the content-free
    probabilities is this subtraction in log space; their normalisation is one constant per row."""
    scores = engine.score_labels(prompts, slots, labels, batch_size=batch_size)
    priors = engine.score_labels(content_free, slots, labels, batch_size=batch_size)
    return [
        labels[max(range(len(labels)), key=lambda i: row[i] - prior[i])]
        for row, prior in zip(scores, priors, strict=True)
    ]


def decode_median(
    engine: Engine, labels: Sequence[str], prompts: Sequence[str], slots: Sequence[int], batch_size: int = 16
) -> list[str]:
    """For ordered labels (listed in their order): the median of the model's distribution over them, the
    answer with the least expected absolute error. The most likely rating can sit at one end while most
    of the mass lies toward the middle; MAE, the rating tasks' metric, charges for that distance."""
    if not prompts:
        return []
    scores = torch.tensor(engine.score_labels(prompts, slots, labels, batch_size=batch_size))
    cumulative = torch.softmax(scores, dim=-1).cumsum(dim=-1)
    # The first label whose cumulative mass reaches one half; the clamp absorbs rounding at the top end.
    middle = torch.full((len(prompts), 1), 0.5, dtype=cumulative.dtype)
    index = torch.searchsorted(cumulative.contiguous(), middle).squeeze(-1).clamp(max=len(labels) - 1)
    return [labels[i] for i in index.tolist()]
