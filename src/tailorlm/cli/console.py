"""One way to print results: a rich rendering for people, or one JSON object on stdout with ``--json``.

Progress and chatter go to stderr so that ``--json`` output stays machine-readable.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from tailorlm.files import json_text
from tailorlm.progress import ProgressCallback, Reporter

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def emit(payload: dict, as_json: bool, render: Callable[[dict], None]) -> None:
    """Print ``payload`` as JSON, or hand it to ``render`` for the human view."""
    if as_json:
        sys.stdout.write(json_text(payload) + "\n")
        sys.stdout.flush()
    else:
        render(payload)


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    grid = Table(title=title, show_lines=False)
    for column in columns:
        grid.add_column(column)
    for row in rows:
        grid.add_row(*[fmt(cell) for cell in row])
    return grid


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def progress_bar(visible: bool = True) -> Progress:
    """A progress display on stderr with counts, elapsed time and ETA; invisible when ``visible`` is false
    (tests, --json runs) so callers need no second code path."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err,
        disable=not visible,
        transient=False,
    )


class ConsoleReporter(Reporter):
    """Messages and progress bars on stderr; ``visible=False`` keeps messages and hides bars (--json)."""

    def __init__(self, visible: bool = True) -> None:
        self.visible = visible

    def log(self, message: str) -> None:
        err.print(message, highlight=False)

    def progress(self, label: str) -> ProgressCallback:
        bar = progress_bar(self.visible)
        task: list[TaskID] = []  # the bar starts on the first call: work that never reports draws nothing

        def update(done: int, total: int) -> None:
            if not task:
                bar.start()
                task.append(bar.add_task(label, total=total))
            bar.update(task[0], completed=done, total=total)
            if done >= total:
                bar.stop()

        return update
