"""Evaluation tasks, registered by name (lm-evaluation-harness style).

A task names its data source, what kind of scoring it needs and a version that changes whenever
its prompts or scoring change. ``--data`` is always a path (a file or the folder a data set ships
as); ``--split`` picks a split; ``--columns`` maps languages to columns of the user's own CSV/JSONL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from polyalign.data.builtin import BUILTIN_SPLITS, builtin_benchmark, interleave_groups, select_split
from polyalign.data.loaders import MULTIJAIL_HUB, load_source
from polyalign.data.records import ParallelRecord
from polyalign.errors import PolyalignError
from polyalign.registry import Registry


@dataclass(frozen=True)
class Task:
    """An evaluation task. ``max_new_tokens`` is the task's generation default, used when the user
    does not pass ``--max-new-tokens`` (lm-evaluation-harness's per-task ``generation_kwargs``):
    a refusal shows in the first few dozen tokens, while MGSM's chain of thought needs a few hundred
    before the number (at 128 the 0.5B model's English answers are cut before it)."""

    name: str
    kind: str                     # safety (harmful prompts) | benign (over-refusal) | mgsm | mmlu
    loader: str | None            # data-layer loader name, or None for the built-in benchmark
    default_data: str | None      # used when --data is not given
    version: str
    description: str
    category: str | None = None   # built-in benchmark: harmful | benign
    max_new_tokens: int = 64

    def load(self, data: str | None = None, split: str | None = None,
             columns: dict[str, str] | str | None = None, seed: int = 0) -> list[ParallelRecord]:
        """Records of ``data`` (always a path) or the task's default source, optionally one split.

        ``split``: train | dev | test | all, by each record's ``meta.split`` where it has one, else a
        hash of its prompt id; ``eval`` is the old name of the held-out split and means ``dev``. The
        built-in benchmark defaults to dev (recipes are chosen there; test only for final reports),
        any other source to everything. Records come interleaved over their categories and
        borderline kinds (the built-in benchmark: in a shuffle seeded by ``seed``; files: in file order
        within each), so a ``--limit`` is stratified.
        """
        if self.loader is None and data is None:
            return builtin_benchmark(self.category, split=split or "dev", seed=seed)
        if data is None and self.default_data is None:
            raise PolyalignError(f"task {self.name} needs --data PATH ({self.description})")
        path = data or self.default_data
        if data is not None and data in BUILTIN_SPLITS and not Path(data).exists():
            raise PolyalignError(f"--data is a path; for the built-in benchmark's {data} split use --split {data}")
        if self.loader is None or columns:
            records = load_source(path, None, columns)                     # the user's own prompts
        elif self.loader == "xstest":
            records = load_source(path, "xstest", label="safe")
        else:
            records = load_source(path, self.loader)
        if split not in (None, "all", "train", "dev", "test"):
            raise PolyalignError(f"--split for a data file must be train, dev, test or all, got {split!r}")
        records = select_split(records, split, path)
        # Category-ordered files (XSafety: 200 rows of one category, then the next): round-robin over
        # categories, so that --limit N covers every category instead of the first one.
        return interleave_groups(records)


TASKS: Registry[Task] = Registry("task", hint="`polyalign tasks` lists them")


def _add(task: Task) -> None:
    TASKS.register(task.name, task)


_add(Task("builtin-harmful", "safety", None, None, "2",
          "polyalign's benchmark v2: 240 harmful requests (10 harm categories) in en + 8 languages", "harmful"))
_add(Task("builtin-benign", "benign", None, None, "2",
          "polyalign's benchmark v2: 256 benign requests (everyday, maths, facts, 96 borderline) in en + 8 "
          "languages (over-refusal)", "benign"))
_add(Task("multijail", "safety", "multijail", MULTIJAIL_HUB, "1", "MultiJail CSV (local path, or the hub)"))
_add(Task("xsafety", "safety", "xsafety", None, "1", "XSafety raw folder"))
_add(Task("pku-multilingual", "safety", "mlc-pku", None, "1", "MLC's multilingual PKU-SafeRLHF file"))
_add(Task("advbench", "safety", "advbench", None, "1", "AdvBench folder or harmful_behaviors.csv"))
_add(Task("parallel", "safety", "jsonl", None, "1", "any canonical parallel JSONL of harmful prompts"))
_add(Task("xstest", "benign", "xstest", None, "1", "XSTest folder or xstest_prompts.csv: share of safe prompts refused"))
_add(Task("benign-parallel", "benign", "jsonl", None, "1", "any canonical parallel JSONL of benign prompts"))
_add(Task("mgsm", "mgsm", "mgsm", None, "1", "MGSM folder: numeric exact match and refusal rate", max_new_tokens=384))
_add(Task("mmlu", "mmlu", "mmlu", None, "1", "MMLU folder: 5-shot log-likelihood accuracy"))


def get_task(name: str) -> Task:
    return TASKS.get(name)

