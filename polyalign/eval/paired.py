"""Paired before/after tables of two evaluation runs (``polyalign report A B``, the sweep).

Rows of the two runs' ``judged.jsonl`` are matched by (prompt_id, lang); the statistics live in
:mod:`polyalign.eval.stats`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from polyalign.errors import DataError, PolyalignError
from polyalign.eval.stats import METRICS, POOLED, paired_table

__all__ = ["load_judged", "paired_runs", "paired_markdown", "paired_console"]


def load_judged(run: str | Path) -> list[dict[str, Any]]:
    """The judged rows of an evaluation run folder (``judged.jsonl``)."""
    path = Path(run) / "judged.jsonl"
    if not path.exists():
        raise PolyalignError(f"{run}: no judged.jsonl (not an evaluation run folder, or an mmlu run)")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON ({e.msg})", path, i) from None
    return rows


def paired_runs(run_a: str | Path, run_b: str | Path, kind: str, iters: int = 2000,
                seed: int = 0) -> list[dict[str, Any]]:
    """:func:`~polyalign.eval.stats.paired_table` of two run folders (A before, B after)."""
    return paired_table(load_judged(run_a), load_judged(run_b), kind, iters=iters, seed=seed)


def _pct(x: float) -> str:
    return "nan" if x != x else f"{100 * x:.1f}%"


def _ci(lo: float, hi: float) -> str:
    return "-" if lo != lo else f"[{100 * lo:+.1f}, {100 * hi:+.1f}]"


HEADER = ("metric", "language", "n pairs", "before", "after", "diff (pp)", "95% CI (pp)")
NOTE = ("Pairs matched by (prompt_id, lang). Per language: Newcombe's paired interval (method 10, "
        f"Wilson-based); `{POOLED}`: pooled over non-English languages, cluster bootstrap over prompt ids.")


def _cells(r: dict[str, Any]) -> list[str]:
    n = f"{r['n']}" + (f" ({r['clusters']} prompts)" if "clusters" in r else "")
    return [r["metric"], r["lang"], n, _pct(r["before"]), _pct(r["after"]), f"{100 * r['diff']:+.1f}",
            _ci(r["lo"], r["hi"])]


def paired_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|---" * len(HEADER) + "|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines + ["", NOTE])


def paired_console(rows: list[dict[str, Any]], console: Any, title: str) -> None:
    """A rich table; a difference whose interval excludes 0 is coloured by its direction."""
    from rich.table import Table

    t = Table(title=title)
    for col in HEADER:
        t.add_column(col, justify="left" if col in ("metric", "language") else "right")
    for r in rows:
        cells = _cells(r)
        if r["lo"] > 0 or r["hi"] < 0:
            good = (r["diff"] > 0) == METRICS[r["metric"]][2]
            color = "green" if good else "red"
            cells[5] = f"[{color}]{cells[5]}[/{color}]"
        t.add_row(*cells, end_section=r["lang"] == POOLED)
    console.print(t)
    console.print(NOTE, highlight=False)
