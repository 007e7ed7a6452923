"""The canonical parallel record and its JSONL form.

One record = one prompt in several languages: ``{"id", "category", "texts": {lang: text}, "meta"}``.
Every loader in :mod:`polyalign.data.loaders` returns these, so training and evaluation never
see a data set's own quirks.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polyalign.errors import DataError
from polyalign.text.languages import normalize_code

# Record categories that are benign requests (training treats them apart): the built-in benchmark's
# ``benign`` and XSafety's ``commonsense`` (its helpfulness control set).
BENIGN_CATEGORIES = ("benign", "commonsense")


@dataclass
class ParallelRecord:
    id: str
    texts: dict[str, str]
    category: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "texts": self.texts}
        if self.category is not None:
            d["category"] = self.category
        if self.meta:
            d["meta"] = self.meta
        return d

    @property
    def languages(self) -> list[str]:
        return list(self.texts)


def validate_records(records: list[ParallelRecord], source: str | Path) -> list[ParallelRecord]:
    """Unique ids, known language codes, non-empty texts; rows are named 1-based."""
    seen: set[str] = set()
    for i, r in enumerate(records, start=1):
        if not r.id:
            raise DataError("empty prompt id", source, row=i)
        if r.id in seen:
            raise DataError(f"duplicate prompt id {r.id!r}", source, row=i)
        seen.add(r.id)
        if not r.texts:
            raise DataError("record has no texts", source, row=i)
        for lang, text in r.texts.items():
            normalize_code(lang)
            if not isinstance(text, str) or not text.strip():
                raise DataError("empty text", source, row=i, column=lang)
    return records


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write through a temp file + rename so a crash never leaves half a file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_records(path: str | Path, records: Iterable[ParallelRecord]) -> int:
    lines = [json.dumps(r.to_json(), ensure_ascii=False) for r in records]
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
    return len(lines)


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for each non-blank line, with file/row in every error."""
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", path)
    try:
        with path.open(encoding="utf-8-sig") as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"invalid JSON ({e.msg} at char {e.pos})", path, row=n) from None
                if not isinstance(obj, dict):
                    raise DataError("expected a JSON object", path, row=n)
                yield n, obj
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text (byte {e.start})", path) from None


def read_records(path: str | Path) -> list[ParallelRecord]:
    """Read canonical JSONL written by :func:`write_records`."""
    out = []
    for n, obj in iter_jsonl(path):
        if "texts" not in obj or not isinstance(obj["texts"], dict):
            raise DataError("missing 'texts' object", path, row=n, column="texts")
        if "id" not in obj:
            raise DataError("missing 'id'", path, row=n, column="id")
        texts = {}
        for lang, text in obj["texts"].items():
            try:
                texts[normalize_code(lang)] = text
            except Exception as e:
                raise DataError(str(e), path, row=n, column=f"texts.{lang}") from None
        out.append(ParallelRecord(str(obj["id"]), texts, obj.get("category"), obj.get("meta") or {}))
    return validate_records(out, path)


def stable_hash(text: str) -> int:
    """Process-independent hash (Python's ``hash`` is salted per run)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def split_of(prompt_id: str, dev: float = 0.1, test: float = 0.1, seed: int = 0) -> str:
    """Deterministic split by prompt id: every language of a prompt lands in the same split."""
    u = stable_hash(f"{seed}:{prompt_id}") / 2**64
    return "test" if u < test else "dev" if u < test + dev else "train"


def split_records(records: list[ParallelRecord], dev: float = 0.1, test: float = 0.1,
                  seed: int = 0) -> dict[str, list[ParallelRecord]]:
    out: dict[str, list[ParallelRecord]] = {"train": [], "dev": [], "test": []}
    for r in records:
        out[split_of(r.id, dev, test, seed)].append(r)
    return out


def select_languages(records: list[ParallelRecord], languages: list[str] | None) -> list[ParallelRecord]:
    """Keep only ``languages`` in each record (records lacking all of them are dropped)."""
    if not languages:
        return records
    out = []
    for r in records:
        texts = {lang: r.texts[lang] for lang in languages if lang in r.texts}
        if texts:
            out.append(ParallelRecord(r.id, texts, r.category, r.meta))
    return out
