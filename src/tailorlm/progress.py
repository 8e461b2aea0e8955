"""How long-running work tells a person what it is doing without printing: it calls a ``Reporter``. The
command line hands in one that draws on the terminal (``cli.console.ConsoleReporter``); everything else
gets the silent default, so the engine, training, methods and benchmark import no UI library."""

from __future__ import annotations

from collections.abc import Callable

# (units done, units in all), called as work advances; the last call has done == total.
ProgressCallback = Callable[[int, int], None]


def _ignore(done: int, total: int) -> None:
    return None


class Reporter:
    """Silent: messages and progress go nowhere."""

    def log(self, message: str) -> None:
        return None

    def progress(self, label: str) -> ProgressCallback:
        """A callback that shows progress of one piece of work named ``label``."""
        return _ignore
