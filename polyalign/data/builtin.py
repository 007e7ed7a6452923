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
from polyalign.data.records import ParallelRecord, read_records, record_split, split_records, stable_hash
from polyalign.errors import PolyalignError

# ``eval`` is the name of the held-out split before 2026-12-04 (train | eval): it now means ``dev``,
# so the demo and the older sweep specs keep running and none of them sees ``test``.
BUILTIN_SPLITS = ("train", "dev", "test", "eval", "all")


def builtin_path() -> Path:
    """Where the built-in benchmark's file is (package data)."""
    with resources.as_file(resources.files("polyalign") / "resources" / "benchmark.jsonl") as p:
        return Path(p)


def select_split(records: list[ParallelRecord], split: str | None, source: str | Path) -> list[ParallelRecord]:
    """The records of one split by :func:`~polyalign.data.records.record_split` (``meta.split``
    first); ``eval`` is ``dev``, None / ``all`` every record. An empty ``test`` is an error: a file
    whose records carry no ``meta.split: test`` has no test set, and silently evaluating nothing
    (or the dev records) would report the wrong numbers."""
    if split not in (None, *BUILTIN_SPLITS):
        raise PolyalignError(f"split must be train, dev, test, eval (= dev) or all, got {split!r}")
    if split in (None, "all"):
        return list(records)
    want = "dev" if split == "eval" else split
    chosen = [r for r in records if record_split(r) == want]
    if want == "test" and not chosen and records:
        raise PolyalignError(f"{source}: no record has meta.split test, so there is no test split to evaluate")
    return chosen


def builtin_benchmark(category: str | None = None, split: str | None = None, seed: int = 0) -> list[ParallelRecord]:
    """The project's own parallel benchmark (``polyalign/resources/benchmark.jsonl``).

    Records carry ``meta.split`` (train | dev | test, disjoint; ``eval`` in the layout before
    2026-12-04, read as dev) and ``category`` (harmful | benign). ``split``: train, dev, test, eval
    (= dev) or all (None: all). Records come stratified (:func:`interleave_groups`, ``seed``).
    """
    path = builtin_path()
    records = read_records(path)
    chosen = [r for r in select_split(records, split, path) if category is None or r.category == category]
    return interleave_groups(chosen, seed)


def finest_category(r: ParallelRecord) -> str | None:
    """The finest category a record names: the built-in benchmark's harm category or benign type,
    else the data set's own category (XSafety's 14), else None."""
    return r.meta.get("harm_category") or r.meta.get("benign_type") or r.category


def _round_robin(groups: list[list[ParallelRecord]]) -> list[ParallelRecord]:
    out: list[ParallelRecord] = []
    for i in range(max((len(g) for g in groups), default=0)):
        out += [g[i] for g in groups if i < len(g)]
    return out


def interleave_groups(records: list[ParallelRecord], seed: int | None = None) -> list[ParallelRecord]:
    """Every record, ordered so that the first N of them, which ``--limit`` takes, cover every
    category evenly: round-robin over harm categories / benign types, and inside each over its
    ``borderline_type`` (the six kinds of borderline prompt); with a ``seed``, each group in a
    seeded order (the built-in benchmark), else in file order (a user's own file).

    In file order a limit took only the first borderline kind (homonym) and the first prompts of
    each category. The seeded order sorts by a hash of (seed, prompt id): the same ``seed`` always
    gives the same order, and a record added to the file later does not reorder the others of its group."""
    groups: dict[str | None, dict[str | None, list[ParallelRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        groups[finest_category(r)][r.meta.get("borderline_type")].append(r)
    ordered = []
    for subs in groups.values():
        for g in subs.values():
            if seed is not None:
                g.sort(key=lambda r: stable_hash(f"{seed}:{r.id}"))
        ordered.append(_round_robin(list(subs.values())))
    return _round_robin(ordered)


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
    """Training records of ``source`` (split, then filtered to ``categories``, then a stratified
    ``limit``). A record's ``meta.split`` decides its split, else the hash of its id. Training never
    reads ``test``. The built-in benchmark gives its train split for ``train`` and ``all`` (its
    dev and test records are held out from every recipe) and its dev split for ``dev``."""
    if split == "test":
        raise PolyalignError(f"{source}: training data never comes from the test split (data.split=test); "
                             "use train (or dev)")
    if source.startswith("builtin:"):
        category = source.split(":", 1)[1]
        if category not in ("harmful", "benign", "all"):
            raise PolyalignError(f"unknown built-in prompt set {source!r}; use builtin:harmful|benign|all")
        records = builtin_benchmark(None if category == "all" else category,
                                    split="train" if split == "all" else split)
    else:
        records = load_source(source, fmt)
        if split != "all":
            if split not in ("train", "dev"):
                raise PolyalignError(f"{source}: data.split must be train, dev or all, got {split!r}")
            records = split_records(records)[split]
    if categories is not None:
        known = {r.category for r in records}
        missing = sorted(set(categories) - known)
        if missing:
            raise PolyalignError(f"{source}: no records of category {', '.join(missing)}; "
                                 f"categories: {', '.join(sorted(map(str, known)))}")
        records = [r for r in records if r.category in categories]
    return stratified_sample(records, limit, seed) if limit else records
