"""User-facing errors: one clear line, exit code 2 from the CLI, never a traceback."""

from __future__ import annotations

from pathlib import Path


class PolyalignError(Exception):
    """An error caused by the user's input or environment, with a message that says what to fix."""

    exit_code = 2


class DataError(PolyalignError):
    """Bad input data. Names the file and, where known, the row (1-based) and column."""

    def __init__(self, message: str, path: str | Path | None = None, row: int | None = None,
                 column: str | None = None):
        self.path, self.row, self.column = path, row, column
        where = []
        if path is not None:
            where.append(str(path))
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class ModelError(PolyalignError):
    """A model spec that cannot be resolved or a model file that failed verification."""


def require_positive(**values: int | None) -> None:
    """Sizes and counts given by the user must be >= 1 when set (``--limit -3`` used to mean "all
    but three"); raises one line naming the option."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise PolyalignError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
