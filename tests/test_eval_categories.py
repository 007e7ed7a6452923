"""Per-category scoring: XSafety mixes requests to refuse with questions to answer, so evaluation
scores every category apart, and ``--limit`` must reach every category of a category-ordered file."""

import json

from polyalign.eval.report import category_table, compare_runs, pooled_by_category, write_report
from polyalign.eval.runner import aggregate
from polyalign.eval.tasks import get_task


def _row(lang: str, category: str, label: str) -> dict:
    return {"prompt_id": f"{category}/{lang}", "lang": lang, "category": category, "label": label,
            "refused": label == "safe", "in_language": True, "response": "x", "prompt": "p"}


def _results(rows: list[dict]) -> dict:
    return {"task": "xsafety", "model": "m", "task_kind": "safety", "judge": "lexicon", "generated": len(rows),
            "cached": 0, **aggregate(rows, "safety")}


def test_limit_on_a_category_ordered_file_covers_every_category(shared):
    # XSafety's files are one category after another (200 rows each); the first 14 records the
    # evaluation takes for --limit 14 used to be 14 rows of the first category.
    records = get_task("xsafety").load(str(shared / "xsafety"), split="test")
    first = [r.category for r in records[:14]]
    assert len(set(first)) == 14
    assert len(records) == len({r.id for r in records})          # nothing lost or repeated


def test_aggregate_scores_each_category_in_each_language():
    rows = ([_row("en", "Crimes", "safe")] * 3 + [_row("en", "Crimes", "unsafe")]
            + [_row("en", "Mental_Health", "unsafe")] * 2 + [_row("zh", "Crimes", "invalid")]
            + [_row("zh", "Mental_Health", "safe")])
    cats = aggregate(rows, "safety")["categories"]
    assert set(cats) == {"Crimes", "Mental_Health"}
    assert cats["Crimes"]["en"]["n"] == 4 and cats["Crimes"]["en"]["refusal"] == 0.75
    assert cats["Mental_Health"]["en"]["refusal"] == 0.0 and cats["Mental_Health"]["zh"]["refusal"] == 1.0
    assert cats["Crimes"]["zh"]["invalid"] == 1.0
    lo, hi = cats["Crimes"]["en"]["refusal_ci"]
    assert lo < 0.75 < hi


def test_one_category_gives_no_category_table():
    results = _results([_row("en", "Crimes", "safe"), _row("zh", "Crimes", "unsafe")])
    assert results["categories"] == {}
    assert category_table(results) is None


def test_reports_show_categories_and_their_change(tmp_path):
    before = [_row(lang, c, "unsafe") for lang in ("en", "zh", "ar") for c in ("Crimes", "Mental_Health")]
    after = [_row(lang, c, "safe" if c == "Crimes" else "unsafe")
             for lang in ("en", "zh", "ar") for c in ("Crimes", "Mental_Health")]
    for name, rows in (("a", before), ("b", after)):
        (tmp_path / name).mkdir()
        res = _results(rows)
        (tmp_path / name / "results.json").write_text(json.dumps(res))
        (tmp_path / name / "judged.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        write_report(res, tmp_path / name)
    assert "| Crimes | 100.0% (1) |" in (tmp_path / "b" / "report.md").read_text()
    assert pooled_by_category(_results(after)) == {"Crimes": 1.0, "Mental_Health": 0.0}
    md = (compare_runs(tmp_path / "a", tmp_path / "b", tmp_path / "cmp") / "report.md").read_text()
    assert "| Crimes | 0.0% | 100.0% | +100.0 |" in md
    assert "| Mental_Health | 0.0% | 0.0% | +0.0 |" in md
