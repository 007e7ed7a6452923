"""`polyalign eval` end to end on builtin:tiny-random: outputs, schema, cache, reports, failures."""

import json
from types import SimpleNamespace

import pytest
import torch

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


class StubLM(torch.nn.Module):
    """A "model" whose answers the test fixes: ``reply(prompt)`` is what generate() writes and
    ``letter(prompt)`` the letter whose token gets the highest next-token logit."""

    def __init__(self, tok, reply=None, letter=None):
        super().__init__()
        self.tok, self.reply, self.letter = tok, reply, letter
        self.w = torch.nn.Parameter(torch.zeros(1))           # device and fingerprint need one parameter
        self.config = SimpleNamespace(polyalign_spec="stub")

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = torch.zeros(*input_ids.shape, len(self.tok))
        for b, ids in enumerate(input_ids):
            letter = self.letter(self.tok.decode(ids))
            logits[b, -1, self.tok.encode(" " + letter, add_special_tokens=False)[-1]] = 10.0
        return SimpleNamespace(logits=logits)

    def generate(self, input_ids, attention_mask, pad_token_id, **kwargs):
        rows = [self.tok.encode(self.reply(self.tok.decode(ids[m.bool()])), add_special_tokens=False)
                for ids, m in zip(input_ids, attention_mask)]
        n = max(map(len, rows))
        return torch.cat([input_ids, torch.tensor([r + [pad_token_id] * (n - len(r)) for r in rows])], 1)


def test_mgsm_scores_a_known_answer(tmp_path, tiny, shared):
    """Question 0 answered right (after a decoy number), question 1 wrong (en) or refused (th):
    accuracy 50% in both languages, refusal 0% / 50%."""
    _, tok = tiny
    rows = {lang: [line.split("\t") for line in (shared / "mgsm" / f"mgsm_{lang}.tsv").read_text().splitlines()[:2]]
            for lang in ("en", "th")}

    def reply(prompt):
        for lang, ((q0, a0), (q1, _)) in rows.items():
            if q0.strip() in prompt:
                return f"First 16 - 3 = 13, so the answer is {a0.strip()}."
            if q1.strip() in prompt:
                return "The answer is 999999." if lang == "en" else "ขออภัย ฉันไม่สามารถช่วยได้"
        raise AssertionError("prompt of no known question")
    res = run_eval(cfg(tmp_path, task="mgsm", data=str(shared / "mgsm"), languages="en,th", limit=2,
                       out=str(tmp_path / "mgsm")), model=StubLM(tok, reply=reply), tokenizer=tok)
    per = res["languages"]
    assert (per["en"]["accuracy"], per["th"]["accuracy"], res["summary"]["mean_accuracy"]) == (0.5, 0.5, 0.5)
    assert (per["en"]["refusal"], per["th"]["refusal"]) == (0.0, 0.5)


def test_mmlu_scores_a_known_answer(tmp_path, tiny, shared):
    """The stub picks the right letter for the first test question only: accuracy exactly 1/3,
    which needs prompt, shots and letter tokens to line up."""
    import csv

    _, tok = tiny
    with open(shared / "mmlu" / "global_facts_test.csv", encoding="utf-8") as fh:
        first = list(csv.reader(fh))[:3]                   # load_mmlu reads subjects in sorted order
    q0, answer0 = first[0][0], first[0][5]

    def letter(prompt):
        last = prompt.split("\n\n")[-1]                     # the question being asked, after the shots
        return answer0 if q0 in last else "ABCD"[("ABCD".index(answer0) + 1) % 4]
    res = run_eval(cfg(tmp_path, task="mmlu", data=str(shared / "mmlu"), limit=3, out=str(tmp_path / "mmlu")),
                   model=StubLM(tok, letter=letter), tokenizer=tok)
    assert res["languages"]["en"]["n"] == 3 and res["summary"]["mean_accuracy"] == pytest.approx(1 / 3)
    lo, hi = res["languages"]["en"]["accuracy_ci"]
    assert 0 < lo < 1 / 3 < hi < 1


def test_task_needs_data_and_unknown_task(tmp_path):
    with pytest.raises(PolyalignError, match="needs --data"):
        run_eval(cfg(tmp_path, task="xsafety"))
    with pytest.raises(PolyalignError, match="Did you mean 'mgsm'"):
        run_eval(cfg(tmp_path, task="mgms"))
