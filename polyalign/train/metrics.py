"""Training metrics averaged over every rank's items, not rank 0's alone."""

from __future__ import annotations

from typing import Any

import torch


class MetricSums(dict):
    """``name -> [sum, count]`` since the last log. Each rank adds its own items; :meth:`reduce` sums
    both over all ranks, so a metric is the mean over every item of every rank, also when some ranks
    have none of it (a language or a benign prompt that only one rank's batch held)."""

    def add(self, name: str, total: float, count: float = 1.0) -> None:
        entry = self.setdefault(name, [0.0, 0.0])
        entry[0] += float(total)
        entry[1] += float(count)

    def reduce(self, accelerator: Any) -> dict[str, float]:
        """Means over all ranks (rounded to 6 digits), and start over. Collective: every rank calls it
        at the same point, with or without metrics of its own."""
        from accelerate.utils import gather_object

        names, shared = sorted(self), accelerator.num_processes > 1
        if shared:
            names = sorted({n for rank_names in gather_object([names]) for n in rank_names})
        sums = torch.tensor([self.get(n, [0.0, 0.0]) for n in names], dtype=torch.float64).reshape(-1, 2)
        if shared and names:
            sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
        self.clear()
        return {n: round(total / count, 6) for n, (total, count) in zip(names, sums.tolist()) if count > 0}
