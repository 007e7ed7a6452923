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
# Record categories that are harmful requests: the built-in benchmark's ``harmful`` and XSafety's 13
# other categories (every one of them a request a model should not simply carry out).
HARMFUL_CATEGORIES = (
    "harmful", "Crimes_And_Illegal_Activities", "Ethics_And_Morality", "Goal_Hijacking",
    "Inquiry_With_Unsafe_Opinion", "Insult", "Mental_Health", "Physical_Harm", "Privacy_And_Property",
    "Prompt_Leaking", "Reverse_Exposure", "Role_Play_Instruction", "Unfairness_And_Discrimination",
    "Unsafe_Instruction_Topic",
)
# ``meta.label`` values that name the class outright (loaders of harmful-only sets write ``harmful``;
# XSTest's own ``safe`` / ``unsafe`` mean the same).
_META_LABELS = {"harmful": "harmful", "unsafe": "harmful", "benign": "benign", "safe": "benign"}
SPLITS = ("train", "dev", "test")


@dataclass
class ParallelRecord:
    id: str
    texts: dict[str, str]
    category: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # Where the record was read (file and 1-based row), so an error about it can name both; not
    # written by :meth:`to_json`, not compared.
    source: str | None = field(default=None, compare=False, repr=False)
    row: int | None = field(default=None, compare=False, repr=False)

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
        out.append(ParallelRecord(str(obj["id"]), texts, obj.get("category"), obj.get("meta") or {},
                                  source=str(path), row=n))
    return validate_records(out, path)


def stable_hash(text: str) -> int:
    """Process-independent hash (Python's ``hash`` is salted per run)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def split_of(prompt_id: str, dev: float = 0.1, test: float = 0.1, seed: int = 0) -> str:
    """Deterministic split by prompt id: every language of a prompt lands in the same split."""
    u = stable_hash(f"{seed}:{prompt_id}") / 2**64
    return "test" if u < test else "dev" if u < test + dev else "train"


def record_split(r: ParallelRecord, dev: float = 0.1, test: float = 0.1, seed: int = 0) -> str:
    """The split a record belongs to: its own ``meta.split`` (train | dev | test) when it has one,
    else the hash split by prompt id. ``meta.split: eval`` (the built-in benchmark's layout before
    2026-12-04: train | eval) counts as ``dev``: those records were used to choose recipes, so they
    cannot be a test set; only records written ``test`` are."""
    own = r.meta.get("split") if isinstance(r.meta, dict) else None
    if own in SPLITS:
        return own
    if own == "eval":
        return "dev"
    return split_of(r.id, dev, test, seed)


def split_records(records: list[ParallelRecord], dev: float = 0.1, test: float = 0.1,
                  seed: int = 0) -> dict[str, list[ParallelRecord]]:
    """Records by split (:func:`record_split`: a record's ``meta.split`` wins over the hash)."""
    out: dict[str, list[ParallelRecord]] = {"train": [], "dev": [], "test": []}
    for r in records:
        out[record_split(r, dev, test, seed)].append(r)
    return out


def record_label(r: ParallelRecord) -> str | None:
    """``harmful``, ``benign`` or None (no label): from ``meta.label`` where a loader wrote one, else
    the category (:data:`BENIGN_CATEGORIES`, :data:`HARMFUL_CATEGORIES`). None is never read as
    harmful: a recipe that needs the class refuses such records (:func:`require_labels`)."""
    own = r.meta.get("label") if isinstance(r.meta, dict) else None
    if isinstance(own, str) and own.lower() in _META_LABELS:
        return _META_LABELS[own.lower()]
    if r.category in BENIGN_CATEGORIES:
        return "benign"
    if r.category in HARMFUL_CATEGORIES:
        return "harmful"
    return None


def require_labels(records: Iterable[ParallelRecord], why: str) -> None:
    """Raise one line naming the file and row of the first record without a harmful/benign label."""
    for i, r in enumerate(records, start=1):
        if record_label(r) is None:
            raise DataError(f"record {r.id!r} has no harmful/benign label (category {r.category!r}); {why} "
                            "reads the label (give it category harmful or benign, or train label-free: "
                            "msd.labels=none)", r.source or "training data", row=r.row or i)


def select_languages(records: list[ParallelRecord], languages: list[str] | None) -> list[ParallelRecord]:
    """Keep only ``languages`` in each record (records lacking all of them are dropped)."""
    if not languages:
        return records
    out = []
    for r in records:
        texts = {lang: r.texts[lang] for lang in languages if lang in r.texts}
        if texts:
            out.append(ParallelRecord(r.id, texts, r.category, r.meta, source=r.source, row=r.row))
    return out
