"""Evaluation tasks, registered by name (lm-evaluation-harness style).

A task names its data source, what kind of scoring it needs and a version that changes whenever
its prompts or scoring change. ``--data`` points any task at a local file or folder.
"""

from __future__ import annotations

from dataclasses import dataclass

from polyalign.data.builtin import builtin_benchmark
from polyalign.data.loaders import MULTIJAIL_HUB, load_source
from polyalign.data.records import ParallelRecord
from polyalign.errors import PolyalignError
from polyalign.registry import Registry


@dataclass(frozen=True)
class Task:
    name: str
    kind: str                     # safety (harmful prompts) | benign (over-refusal) | mgsm | mmlu
    loader: str | None            # data-layer loader name, or None for the built-in benchmark
    default_data: str | None      # used when --data is not given
    version: str
    description: str
    category: str | None = None   # built-in benchmark: harmful | benign

    def load(self, data: str | None) -> list[ParallelRecord]:
        if self.loader is None:
            return builtin_benchmark(self.category, split=data or "eval")
        path = data or self.default_data
        if path is None:
            raise PolyalignError(f"task {self.name} needs --data PATH ({self.description})")
        if self.loader == "xstest":
            return load_source(path, "xstest", label="safe")
        return load_source(path, self.loader)


TASKS: Registry[Task] = Registry("task")


def _add(task: Task) -> None:
    TASKS.register(task.name, task)


_add(Task("builtin-harmful", "safety", None, None, "1",
          "polyalign's own mini benchmark: harmful requests in en + 8 languages", "harmful"))
_add(Task("builtin-benign", "benign", None, None, "1",
          "polyalign's own mini benchmark: benign requests in en + 8 languages (over-refusal)", "benign"))
_add(Task("multijail", "safety", "multijail", MULTIJAIL_HUB, "1", "MultiJail CSV (local path, or the hub)"))
_add(Task("xsafety", "safety", "xsafety", None, "1", "XSafety raw folder"))
_add(Task("pku-multilingual", "safety", "mlc-pku", None, "1", "MLC's multilingual PKU-SafeRLHF file"))
_add(Task("advbench", "safety", "advbench", None, "1", "AdvBench harmful_behaviors.csv"))
_add(Task("parallel", "safety", "jsonl", None, "1", "any canonical parallel JSONL of harmful prompts"))
_add(Task("xstest", "benign", "xstest", None, "1", "XSTest's 250 safe prompts: share refused"))
_add(Task("benign-parallel", "benign", "jsonl", None, "1", "any canonical parallel JSONL of benign prompts"))
_add(Task("mgsm", "mgsm", "mgsm", None, "1", "MGSM folder: numeric exact match and refusal rate"))
_add(Task("mmlu", "mmlu", "mmlu", None, "1", "MMLU folder: 5-shot log-likelihood accuracy"))


def get_task(name: str) -> Task:
    return TASKS.get(name)

