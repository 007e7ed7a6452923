"""The built-in parallel benchmark and prompt-source specs shared by training and evaluation.

``polyalign/resources/benchmark.jsonl`` stays where it is (package data); this module is the one
reader of it, so neither ``train`` nor ``eval`` needs the other to find prompts.
"""

from __future__ import annotations

import random
from collections import defaultdict
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
    chosen = [r for r in records
              if (category is None or r.category == category) and split in (None, "all", r.meta.get("split"))]
    return interleave_groups(chosen)


def finest_category(r: ParallelRecord) -> str | None:
    """The finest category a record names: the built-in benchmark's harm category or benign type,
    else the data set's own category (XSafety's 14), else None."""
    return r.meta.get("harm_category") or r.meta.get("benign_type") or r.category


def interleave_groups(records: list[ParallelRecord]) -> list[ParallelRecord]:
    """Round-robin over harm categories / benign types (file order within each), so that the
    first N records of any split, which ``--limit`` takes, cover every category evenly."""
    groups: dict[str | None, list[ParallelRecord]] = defaultdict(list)
    for r in records:
        groups[finest_category(r)].append(r)
    out: list[ParallelRecord] = []
    for i in range(max((len(g) for g in groups.values()), default=0)):
        out += [g[i] for g in groups.values() if i < len(g)]
    return out


def stratified_sample(records: list[ParallelRecord], limit: int, seed: int = 0) -> list[ParallelRecord]:
    """``limit`` records drawn evenly across categories (round-robin over seeded shuffles), in
    their original order. A category with fewer records than its share gives the rest to the others.
    The category is the finest one a record names: the built-in benchmark's harm category or benign
    type, else the data set's own category."""
    if limit >= len(records):
        return list(records)
    rng = random.Random(seed)
    groups: dict[str | None, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[finest_category(r)].append(i)
    for idx in groups.values():
        rng.shuffle(idx)
    chosen: list[int] = []
    queues = [iter(idx) for idx in groups.values()]
    while len(chosen) < limit:               # one per category per round until the limit
        for q in queues:
            i = next(q, None)
            if i is not None and len(chosen) < limit:
                chosen.append(i)
    return [records[i] for i in sorted(chosen)]


def load_prompts(source: str, fmt: str | None, split: str, limit: int | None,
                 categories: list[str] | None = None, seed: int = 0) -> list[ParallelRecord]:
    """Records of ``source`` (split, then filtered to ``categories``, then a stratified ``limit``)."""
    if source.startswith("builtin:"):
        category = source.split(":", 1)[1]
        if category not in ("harmful", "benign", "all"):
            raise PolyalignError(f"unknown built-in prompt set {source!r}; use builtin:harmful|benign|all")
        records = builtin_benchmark(None if category == "all" else category, split="train")
    else:
        records = load_source(source, fmt)
        if split != "all":
            records = split_records(records)[split]
    if categories is not None:
        known = {r.category for r in records}
        missing = sorted(set(categories) - known)
        if missing:
            raise PolyalignError(f"{source}: no records of category {', '.join(missing)}; "
                                 f"categories: {', '.join(sorted(map(str, known)))}")
        records = [r for r in records if r.category in categories]
    return stratified_sample(records, limit, seed) if limit else records
