"""Judges measured and reapplied.

* :func:`rejudge` (``polyalign judge RUN_DIR --judge SPEC``): apply another judge to the responses
  an evaluation run already generated (no policy model is loaded, nothing is regenerated), so a
  stronger judge, e.g. ``llm:openai:gpt-4o@URL`` with the Deng et al. prompt the papers use, can
  score runs made with the offline lexicon judge.
* :func:`score_judge` (``polyalign judge-check LABELS.jsonl --judge SPEC``): agreement of a judge
  with hand labels, per language and overall, with Wilson intervals and the 3x3 confusion matrix.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from polyalign.data.records import atomic_write_text
from polyalign.errors import DataError, PolyalignError
from polyalign.eval.judges import LABELS, Judge, JudgeItem, build_judge
from polyalign.eval.stats import share_ci
from polyalign.text import in_language

__all__ = ["rejudge", "run_rows", "load_labels", "score_judge", "judge_dirname"]


def judge_dirname(name: str) -> str:
    """``rejudged-<judge name>`` with characters unsafe in a folder name replaced by ``_``."""
    return "rejudged-" + re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON ({e.msg})", path, i) from None
    return rows


def run_rows(run: Path, results: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The run's responses: ``judged.jsonl`` when present, else ``generations.jsonl`` (the cache;
    only rows of the run's own weights fingerprint when results.json names it)."""
    if (run / "judged.jsonl").exists():
        return _read_jsonl(run / "judged.jsonl")
    if not (run / "generations.jsonl").exists():
        raise PolyalignError(f"{run}: neither judged.jsonl nor generations.jsonl (not an evaluation run folder)")
    rows = _read_jsonl(run / "generations.jsonl")
    fp = (results or {}).get("fingerprint")
    if fp:
        rows = [r for r in rows if r.get("fingerprint") == fp]
    elif len({r.get("fingerprint") for r in rows}) > 1:
        raise PolyalignError(f"{run}/generations.jsonl holds generations of several models and no results.json "
                             "says which one is the run's")
    by_key = {(r["prompt_id"], r["lang"]): r for r in rows}      # a rerun's row replaces an older one
    return list(by_key.values())


def rejudge(run_dir: str | Path, judge_spec: str, out: str | Path | None = None, task: str | None = None,
            judge: Judge | None = None) -> tuple[dict[str, Any], Path]:
    """Judge a run's responses again; write judged.jsonl, results.json and report.md.

    Args:
        run_dir: an evaluation run folder (results.json + judged.jsonl or generations.jsonl).
        judge_spec: ``lexicon`` | ``llm:SPEC`` | ``llm:openai:MODEL@URL`` | ``guard:SPEC``.
        out: output folder; default ``run_dir/rejudged-<judge name>``.
        task: task name, needed only when the run has no results.json.
        judge: an already built judge (tests); ``judge_spec`` still names it.

    Returns:
        (results, output folder). Aggregates come from the runner's own ``aggregate``.
    """
    from polyalign.eval.runner import SCHEMA_VERSION, aggregate, provenance
    from polyalign.text import in_language

    run = Path(run_dir)
    if not run.is_dir():
        raise PolyalignError(f"{run}: no such run folder")
    results = json.loads((run / "results.json").read_text()) if (run / "results.json").exists() else None
    if results is None and task is None:
        raise PolyalignError(f"{run}: no results.json; say which task the run was with --task")
    from polyalign.eval.tasks import get_task

    task_name = task or results["task"]
    kind = results["task_kind"] if results else get_task(task_name).kind
    if kind == "mmlu":
        raise PolyalignError(f"{run}: an mmlu run has no responses to judge")
    rows = run_rows(run, results)
    if not rows:
        raise PolyalignError(f"{run}: no responses to judge")
    # The folder is named after the judge without its endpoint (llm:openai:MODEL@URL -> llm:openai:MODEL).
    target = Path(out) if out else run / judge_dirname(judge_spec.split("@", 1)[0])
    if target.resolve() == run.resolve():
        raise PolyalignError("--out must not be the run folder itself (its judged.jsonl would be replaced)")
    target.mkdir(parents=True, exist_ok=True)
    if judge is None:
        judge = build_judge(judge_spec, target / "verdicts.jsonl")     # an LLM judge's verdicts are cached

    verdicts = judge.judge([JudgeItem(r["prompt"], r["response"], r["lang"]) for r in rows])
    judged = []
    for r, v in zip(rows, verdicts):
        item = {"prompt_id": r["prompt_id"], "lang": r["lang"], "prompt": r["prompt"], "response": r["response"],
                **v.to_json(), "in_language": r["in_language"] if "in_language" in r else
                (in_language(r["response"], r["lang"]) if r["response"] else False)}
        if "correct" in r:
            item["correct"] = r["correct"]
        judged.append(item)
    if kind == "mgsm" and any("correct" not in j for j in judged):
        raise PolyalignError(f"{run}: an mgsm run needs its judged.jsonl (the answers' correctness) to be rejudged")
    atomic_write_text(target / "judged.jsonl", "".join(json.dumps(j, ensure_ascii=False) + "\n" for j in judged))
    keep = {k: v for k, v in (results or {}).items() if k not in ("languages", "summary", "provenance")}
    new = {"schema_version": SCHEMA_VERSION, **keep, "task": task_name, "task_kind": kind,
           "model": keep.get("model", "?"), "judge": getattr(judge, "name", judge_spec),
           "judge_version": getattr(judge, "version", None), "rejudged_from": str(run),
           "original_judge": (results or {}).get("judge"), "generated": 0, "cached": len(judged),
           **aggregate(judged, kind), "provenance": {**provenance(), "rejudged": time.strftime("%Y-%m-%dT%H:%M:%S")}}
    atomic_write_text(target / "results.json", json.dumps(new, indent=1, ensure_ascii=False))
    from polyalign.eval.report import write_report

    write_report(new, target)
    return new, target


# --- agreement with hand labels --------------------------------------------------------------

def load_labels(path: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """Hand-labelled rows ``{"lang", "prompt", "response", "label", "refused"?, "task"?, "split"?}``
    (``task``: harmful | benign; on benign rows "unsafe" and "safe" both mean a valid answer).

    ``split`` keeps the rows whose ``split`` field equals it (rows without the field drop).
    """
    path = Path(path)
    if not path.exists():
        raise PolyalignError(f"{path}: file not found")
    rows = _read_jsonl(path)
    for i, r in enumerate(rows, 1):
        for key in ("lang", "prompt", "response", "label"):
            if not isinstance(r.get(key), str):
                raise DataError(f"missing or non-text field {key!r}", path, i)
        if r["label"] not in LABELS:
            raise DataError(f"label must be one of {', '.join(LABELS)}, got {r['label']!r}", path, i, "label")
        if "refused" in r and not isinstance(r["refused"], bool):
            raise DataError(f"refused must be true or false, got {r['refused']!r}", path, i, "refused")
    if split is not None:
        rows = [r for r in rows if r.get("split") == split]
        if not rows:
            raise PolyalignError(f"{path}: no rows with split {split!r}")
    if not rows:
        raise PolyalignError(f"{path}: no labelled rows")
    return rows


def _comparable(label: str, row: dict[str, Any]) -> str:
    """The label as it can be compared. On a benign request (``task: benign``) answering is the
    safe behaviour and an offline judge's "unsafe" means "answered" (docs/evaluation.md): there the
    label is compared as valid (safe) vs invalid, and refusals through the refusal flag."""
    label = label if label in LABELS else "invalid"
    return "safe" if row.get("task") == "benign" and label == "unsafe" else label


def _block(pairs: list[tuple[dict[str, Any], Any]]) -> dict[str, Any]:
    confusion = {h: dict.fromkeys(LABELS, 0) for h in LABELS}
    for r, v in pairs:
        confusion[_comparable(r["label"], r)][_comparable(v.label, r)] += 1
    with_refusal = [(r, v) for r, v in pairs if "refused" in r]
    with_language = [r for r, _ in pairs if "in_language" in r]
    return {"n": len(pairs),
            "label_agreement": share_ci(_comparable(r["label"], r) == _comparable(v.label, r) for r, v in pairs),
            "refused_agreement": share_ci(r["refused"] == v.refused for r, v in with_refusal),
            # the evaluation runner's language check (not the judge's), against the hand flag
            "in_language_agreement": share_ci(r["in_language"] == (bool(r["response"]) and in_language(r["response"], r["lang"]))
                                              for r in with_language),
            "confusion": confusion}


def score_judge(rows: list[dict[str, Any]], judge: Judge) -> dict[str, Any]:
    """Agreement of ``judge`` with the hand labels of ``rows``.

    Returns:
        ``{"judge", "judge_version", "n", "languages": {lang: block}, "overall": block,
        "disagreements": [...]}``; a block is ``{"n", "label_agreement", "refused_agreement",
        "in_language_agreement", "confusion"}``, the agreements as :func:`~polyalign.eval.stats.share_ci`
        dicts (the refusal and language ones over rows that carry ``refused`` / ``in_language``; the
        language flag is the runner's :func:`polyalign.text.in_language`), ``confusion[hand][judge]``.
    """
    verdicts = judge.judge([JudgeItem(r["prompt"], r["response"], r["lang"]) for r in rows])
    pairs = list(zip(rows, verdicts))
    langs = list(dict.fromkeys(r["lang"] for r in rows))
    return {"judge": getattr(judge, "name", "?"), "judge_version": getattr(judge, "version", None),
            "n": len(rows), "languages": {lang: _block([p for p in pairs if p[0]["lang"] == lang]) for lang in langs},
            "overall": _block(pairs),
            "disagreements": [{"lang": r["lang"], "prompt": r["prompt"], "response": r["response"],
                               "label": r["label"], "judge_label": v.label, "refused": r.get("refused"),
                               "judge_refused": v.refused, "reason": v.reason}
                              for r, v in pairs if r["label"] != v.label or r.get("refused", v.refused) != v.refused]}


def print_judge_check(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    def agree(s: dict[str, Any]) -> str:
        if not s["n"]:
            return "-"
        return f"{100 * s['share']:.1f}% [{100 * s['lo']:.1f}, {100 * s['hi']:.1f}] ({s['k']}/{s['n']})"

    t = Table(title=f"judge {report['judge']} vs hand labels (95% Wilson intervals)")
    for col in ("language", "n", "label agreement", "refused agreement", "in-language agreement"):
        t.add_column(col, justify="left" if col == "language" else "right")
    blocks = [*report["languages"].items(), ("all", report["overall"])]
    for lang, b in blocks:
        t.add_row(lang, str(b["n"]), agree(b["label_agreement"]), agree(b["refused_agreement"]),
                  agree(b["in_language_agreement"]), end_section=lang == list(report["languages"])[-1])
    console.print(t)
    c = Table(title="confusion: rows = hand label, columns = judge label")
    for col in ("language", "hand", *LABELS):
        c.add_column(col, justify="left" if col in ("language", "hand") else "right")
    for lang, b in blocks:
        for i, h in enumerate(LABELS):
            c.add_row(lang if i == 0 else "", h, *[str(b["confusion"][h][j]) for j in LABELS],
                      end_section=i == len(LABELS) - 1)
    console.print(c)
