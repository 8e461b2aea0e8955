"""The one error a malformed or inconsistent data file raises, and the one for an unknown task name."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """A data file is malformed or inconsistent. The message names the file, the record and the field, so
    the person who wrote the file can find the line without a debugger."""

    def __init__(
        self,
        problem: str,
        file: str | Path | None = None,
        record: object | None = None,
        field: str | None = None,
    ) -> None:
        self.problem = problem
        self.file = str(file) if file is not None else None
        self.record = None if record is None else str(record)
        self.field = field
        super().__init__(self._message())

    def _message(self) -> str:
        where = []
        if self.file is not None:
            where.append(f"file {self.file}")
        if self.record is not None:
            where.append(f"record {self.record}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        return f"{', '.join(where)}: {self.problem}" if where else self.problem


class UnknownTaskError(ValueError):
    """A task name that is not known, or a known task asked for in a way it cannot be loaded."""
