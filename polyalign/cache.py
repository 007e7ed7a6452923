"""One append-only JSONL cache for every resumable loop: generations, judge verdicts, translations.

Each finished item is appended as one line, flushed and fsynced before the loop moves on, so a
crash loses at most the item in flight and a rerun redoes only what is missing. A last line left
without its newline by a crash is cut on open; lines that do not parse are skipped (and redone).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def drop_partial_tail(path: Path) -> None:
    """Cut a last line left without its newline by a crash, so the next append starts clean."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        log.warning("%s: dropping an incomplete last line (interrupted write); it will be redone", path)
        with path.open("r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)


def _row_key(row: dict[str, Any]) -> str:
    return row["key"]


class JsonlCache:
    """Rows keyed by ``key_of(row)`` (default: the row's ``"key"`` field), kept in memory and on disk.

    Args:
        path: the JSONL file; None keeps the cache in memory only.
        key_of: how a row names itself (the translation log keys rows by prompt id and language).
    """

    def __init__(self, path: str | Path | None, key_of: Callable[[dict[str, Any]], str] = _row_key):
        self.path = Path(path) if path else None
        self.key_of = key_of
        self.rows: dict[str, dict[str, Any]] = {}
        if self.path is not None and self.path.exists():
            drop_partial_tail(self.path)
            for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
                try:
                    row = json.loads(line)
                    self.rows[key_of(row)] = row
                except (json.JSONDecodeError, KeyError, TypeError):
                    log.warning("%s line %d is unreadable (interrupted write); it will be redone", self.path, n)

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, key: str) -> dict[str, Any] | None:
        return self.rows.get(key)

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        """Append ``rows`` and fsync: once this returns they survive a crash."""
        rows = list(rows)
        for row in rows:
            self.rows[self.key_of(row)] = row
        if self.path is None or not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            fh.flush()
            os.fsync(fh.fileno())
