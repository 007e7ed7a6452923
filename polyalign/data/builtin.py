"""The built-in parallel benchmark and prompt-source specs shared by training and evaluation.

``polyalign/resources/benchmark.jsonl`` stays where it is (package data); this module is the one
reader of it, so neither ``train`` nor ``eval`` needs the other to find prompts.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from polyalign.data.loaders import load_source
from polyalign.data.records import ParallelRecord, read_records, split_records
from polyalign.errors import PolyalignError

BUILTIN_SPLITS = ("train", "eval", "all")


def builtin_benchmark(category: str | None = None, split: str | None = None) -> list[ParallelRecord]:
    """The project's own parallel benchmark (``polyalign/resources/benchmark.jsonl``).

    Records carry ``meta.split`` (train | eval, disjoint) and ``category`` (harmful | benign).
    """
    if split not in (None, *BUILTIN_SPLITS):
        raise PolyalignError(f"built-in benchmark split must be train, eval or all, got {split!r}")
    path = resources.files("polyalign") / "resources" / "benchmark.jsonl"
    with resources.as_file(path) as p:
        records = read_records(Path(p))
    return [r for r in records
            if (category is None or r.category == category) and split in (None, "all", r.meta.get("split"))]


def load_prompts(source: str, fmt: str | None, split: str, limit: int | None) -> list[ParallelRecord]:
    """Prompts for training or probing: ``builtin:harmful|benign|all`` (the benchmark's train split)
    or any path the data layer reads, hash-split by prompt id (``split``: train | dev | test | all)."""
    if source.startswith("builtin:"):
        category = source.split(":", 1)[1]
        if category not in ("harmful", "benign", "all"):
            raise PolyalignError(f"unknown built-in prompt set {source!r}; use builtin:harmful|benign|all")
        records = builtin_benchmark(None if category == "all" else category, split="train")
    else:
        records = load_source(source, fmt)
        if split != "all":
            records = split_records(records)[split]
    return records[:limit] if limit else records
