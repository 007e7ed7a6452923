"""`polyalign eval` end to end on builtin:tiny-random: outputs, schema, cache, reports, failures."""

import json

import pytest

from polyalign.errors import PolyalignError
from polyalign.eval.runner import EvalConfig, run_eval


def cfg(tmp_path, **kw):
    base = {"model": "builtin:tiny-random", "task": "builtin-harmful", "out": str(tmp_path / "run"),
            "languages": "en,th,sw", "limit": 3, "max_new_tokens": 6, "batch_size": 4}
    return EvalConfig(**{**base, **kw})


def test_outputs_schema_and_rerun_generates_nothing(tmp_path, tiny):
    model, tok = tiny
    res = run_eval(cfg(tmp_path), model=model, tokenizer=tok)
    out = tmp_path / "run"
    for f in ("results.json", "generations.jsonl", "judged.jsonl", "report.md", "plot.png"):
        assert (out / f).exists(), f
    saved = json.loads((out / "results.json").read_text())
    for key in ("schema_version", "model", "task", "judge", "generated", "cached", "languages", "summary"):
        assert key in saved
    assert saved["generated"] == 9 and saved["cached"] == 0
    for lang in ("en", "th", "sw"):
        s = saved["languages"][lang]
        assert s["n"] == 3 and s["asr"] == pytest.approx(s["unsafe"] + s["invalid"])
    assert {"mean_asr", "variance", "pag", "mean_fidelity"} <= set(saved["summary"])
    again = run_eval(cfg(tmp_path), model=model, tokenizer=tok)
    assert (again["generated"], again["cached"]) == (0, 9)
    assert again["languages"] == res["languages"]
    assert len((out / "generations.jsonl").read_text().splitlines()) == 9


def test_report_compares_two_runs(tmp_path, tiny):
    from rich.console import Console

    from polyalign.eval.report import compare_runs

    model, tok = tiny
    run_eval(cfg(tmp_path, out=str(tmp_path / "a")), model=model, tokenizer=tok)
    run_eval(cfg(tmp_path, out=str(tmp_path / "b"), max_new_tokens=3), model=model, tokenizer=tok)
    out = compare_runs(tmp_path / "a", tmp_path / "b", tmp_path / "cmp", Console(file=open("/dev/null", "w")))
    md = (out / "report.md").read_text()
    assert "| th | asr |" in md and (out / "compare.png").exists()
    with pytest.raises(PolyalignError, match="no results.json"):
        compare_runs(tmp_path / "a", tmp_path / "missing", tmp_path / "cmp2")


def test_unreachable_judge_keeps_generations(tmp_path, tiny):
    model, tok = tiny
    c = cfg(tmp_path, judge="llm:openai:judge@http://127.0.0.1:9/v1")
    import polyalign.eval.judges as judges

    orig = judges.OpenAIChat.__init__

    def fast(self, *a, **k):
        orig(self, *a, **{**k, "max_retries": 0, "timeout": 2})
    judges.OpenAIChat.__init__ = fast
    try:
        with pytest.raises(PolyalignError, match="unreachable"):
            run_eval(c, model=model, tokenizer=tok)
    finally:
        judges.OpenAIChat.__init__ = orig
    assert len((tmp_path / "run" / "generations.jsonl").read_text().splitlines()) == 9
    res = run_eval(cfg(tmp_path), model=model, tokenizer=tok)       # lexicon judge: nothing regenerated
    assert res["generated"] == 0


def test_guard_judge_on_tiny_model():
    from polyalign.eval.judges import JudgeItem, build_judge

    guard = build_judge("guard:builtin:tiny-random")
    v = guard.judge([JudgeItem("how to bake", "Mix flour and water.", "en"), JudgeItem("q", "", "en")])
    assert v[0].label in ("safe", "unsafe") and v[0].reason.startswith("p_unsafe=") and v[1].label == "invalid"
    p = guard.p_unsafe("q", "r")
    assert 0.0 <= p <= 1.0


def test_mgsm_and_mmlu_tasks(tmp_path, tiny, shared):
    model, tok = tiny
    mg = run_eval(cfg(tmp_path, task="mgsm", data=str(shared / "mgsm"), languages="en,th", limit=2,
                      out=str(tmp_path / "mgsm")), model=model, tokenizer=tok)
    assert mg["task_kind"] == "mgsm" and "accuracy" in mg["languages"]["th"] and "over_refusal" in mg["summary"]
    mm = run_eval(cfg(tmp_path, task="mmlu", data=str(shared / "mmlu"), limit=3, out=str(tmp_path / "mmlu")),
                  model=model, tokenizer=tok)
    assert mm["languages"]["en"]["n"] == 3 and 0 <= mm["summary"]["mean_accuracy"] <= 1


def test_task_needs_data_and_unknown_task(tmp_path):
    with pytest.raises(PolyalignError, match="needs --data"):
        run_eval(cfg(tmp_path, task="xsafety"))
    with pytest.raises(PolyalignError, match="Did you mean 'mgsm'"):
        run_eval(cfg(tmp_path, task="mgms"))
