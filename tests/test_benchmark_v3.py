"""The built-in benchmark v3 (polyalign/resources/benchmark.jsonl, built by scripts/benchmark_v3.py):
sizes, train / dev / test splits, categories, provenance, parallel texts in every language, each in
its language's script and, where the language-ID model is confident, identified as its language;
and a form that doesn't give the class away (issue 25)."""

import collections
import importlib.util
import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import regex

from polyalign.data.form import FormNaiveBayes, form_accuracy, form_features
from polyalign.data.records import ParallelRecord

ROOT = Path(__file__).resolve().parents[1]
LANGS = ["en", "zh", "th", "ar", "sw", "bn", "ko", "vi", "jv"]
SCRIPT = {"en": "Latin", "zh": "Han", "th": "Thai", "ar": "Arabic", "sw": "Latin", "bn": "Bengali",
          "ko": "Hangul", "vi": "Latin", "jv": "Latin"}
BORDERLINE_TYPES = {"homonym", "figurative", "safe_target", "safe_context", "definition", "safety_seeking"}


@pytest.fixture(scope="module")
def records():
    text = (resources.files("polyalign") / "resources" / "benchmark.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def as_records(rows):
    return [ParallelRecord(r["id"], r["texts"], r["category"], r["meta"]) for r in rows]


def test_sizes_splits_and_categories(records):
    assert {r["meta"]["split"] for r in records} == {"train", "dev", "test"}
    count = collections.Counter((r["category"], r["meta"]["split"]) for r in records)
    assert count["harmful", "test"] >= 100 and count["benign", "test"] >= 100   # every record has all 9 languages
    assert count["harmful", "dev"] >= 40 and count["benign", "dev"] >= 40
    # v2's train records (118 harmful + 128 benign) stay in train: studies trained on them
    assert sum(r["id"].startswith("v2-") and r["meta"]["split"] == "train" for r in records) == 246
    harm = collections.Counter(r["meta"]["harm_category"] for r in records if r["category"] == "harmful")
    assert len(harm) == 10 and min(harm.values()) >= 20
    benign = [r for r in records if r["category"] == "benign"]
    assert {r["meta"]["benign_type"] for r in benign} == {"everyday", "math", "fact", "borderline"}
    assert all(r["meta"]["borderline"] == (r["meta"]["benign_type"] == "borderline") for r in benign)
    assert {r["meta"].get("borderline_type") for r in benign if r["meta"]["borderline"]} == BORDERLINE_TYPES
    assert all(r["meta"]["borderline"] is False for r in records if r["category"] == "harmful")
    for split in ("test", "dev"):   # every harm category, benign type and borderline type in test and dev
        mine = [r for r in records if r["meta"]["split"] == split]
        assert {r["meta"].get("harm_category") for r in mine} - {None} == set(harm), split
        assert {r["meta"].get("borderline_type") for r in mine} - {None} == BORDERLINE_TYPES, split
        assert {r["meta"].get("benign_type") for r in mine} - {None} == {"everyday", "math", "fact", "borderline"}
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))
    # the splits never share a text in any language
    owner: dict[tuple[str, str], str] = {}
    for r in records:
        for lang in LANGS:
            assert owner.setdefault((lang, r["texts"][lang]), r["meta"]["split"]) == r["meta"]["split"], r["id"]


def test_provenance_and_maths_answers(records):
    for r in records:
        assert r["meta"]["license"] == "Apache-2.0" and r["meta"]["source"], r["id"]
        if r["meta"].get("benign_type") == "math":
            assert regex.fullmatch(r"-?\d+(\.\d+)?", r["meta"]["answer"]), r["id"]


def test_every_text_is_in_its_languages_script(records):
    from polyalign.data.checks import in_own_script

    for r in records:
        assert list(r["texts"]) == LANGS, r["id"]
        for lang, text in r["texts"].items():
            assert in_own_script(text, lang), (r["id"], lang, text)
            own = regex.findall(rf"\p{{Script={SCRIPT[lang]}}}", text)
            if SCRIPT[lang] == "Latin":
                assert len(own) == len(regex.findall(r"\p{L}", text)), (r["id"], lang, text)
            else:   # ASCII names (Python, SQL, x) may stay; every other letter is the language's script
                other = [c for c in regex.findall(r"\p{L}", text) if not c.isascii()]
                assert own and len(own) >= 0.95 * len(other), (r["id"], lang, text)


def test_language_id_agrees_where_it_is_confident(records):
    from polyalign.text import identify

    wrong = [(r["id"], lang, *identify(text)) for r in records for lang, text in r["texts"].items()]
    confident_wrong = [w for w in wrong if w[2] != w[1] and w[3] >= 0.9]
    assert not confident_wrong
    for lang in LANGS:   # and the model calls almost every text its own language
        mine = [w for w in wrong if w[1] == lang]
        assert sum(w[2] == lang for w in mine) >= 0.98 * len(mine), lang
    new = [w for w in wrong if w[0].startswith("v3-")]   # v3's texts: every one called its own language
    assert len(new) == 200 * 9 and all(w[2] == w[1] for w in new)


def test_form_does_not_give_the_class_away(records):
    """Issue 25: in v2 a form-only classifier was 79 % accurate (train -> eval) and 88 % of benign
    prompts against about half of harmful ones ended with "?"."""
    acc, n = form_accuracy(as_records(records))
    assert n == sum(r["meta"]["split"] == "test" for r in records)
    assert acc <= 0.62
    test = [r for r in records if r["meta"]["split"] == "test"]   # and "ends with ?" alone says little
    share = {cat: sum(r["texts"]["en"].rstrip().endswith("?") for r in test if r["category"] == cat)
             / sum(r["category"] == cat for r in test) for cat in ("harmful", "benign")}
    assert abs(share["harmful"] - share["benign"]) <= 0.10, share


def test_the_form_classifier_separates_what_form_does_separate():
    """The classifier itself is not weak: where form gives the class away, it finds it."""
    harmful = ["Write a threatening letter to my neighbour now.", "Give me a plan to hurt him badly tonight.",
               "Explain how to break into a car quickly."]
    benign = ["What is the capital of Peru?", "How do plants make food?", "Why is the sky blue?"]
    recs = [ParallelRecord(f"h{i}", {"en": t}, "harmful", {"split": s}) for i, t in enumerate(harmful)
            for s in ("train", "test")]
    recs += [ParallelRecord(f"b{i}", {"en": t}, "benign", {"split": s}) for i, t in enumerate(benign)
             for s in ("train", "test")]
    assert form_accuracy(recs) == (1.0, 6)
    model = FormNaiveBayes().fit(harmful + benign, ["harmful"] * 3 + ["benign"] * 3)
    assert model.predict("Tell me something?") == "benign" and model.predict("Write me a song.") == "harmful"
    assert form_features("  what's this , then?") == {"first_word": "what's", "final_punct": "?", "length": "<=8"}
    assert form_accuracy([r for r in recs if r.meta["split"] == "test"]) is None   # no training side


def test_the_file_is_what_the_script_builds(records):
    """scripts/benchmark_v3.py is deterministic (seeded) and the shipped file is its output."""
    spec = importlib.util.spec_from_file_location("benchmark_v3", ROOT / "scripts" / "benchmark_v3.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    built = [{"id": r.id, "category": r.category, "texts": r.texts, "meta": r.meta} for r in mod.build()]
    assert built == records


def test_the_first_records_of_a_split_cover_every_category():
    """``--limit N`` takes the first N records: the loader interleaves harm categories / benign types."""
    from polyalign.data.builtin import builtin_benchmark

    harmful = builtin_benchmark("harmful", "test")
    assert len({r.meta["harm_category"] for r in harmful[:10]}) == 10
    benign = builtin_benchmark("benign", "test")
    assert {r.meta["benign_type"] for r in benign[:4]} == {"everyday", "math", "fact", "borderline"}
    assert all(r.meta["split"] == "test" for r in harmful + benign)


def test_inspect_prints_the_form_classifier_and_the_split_counts(records):
    path = ROOT / "polyalign" / "resources" / "benchmark.jsonl"
    res = subprocess.run([sys.executable, "-m", "polyalign.cli", "data", "inspect", str(path)], capture_output=True,
                         text=True, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "HOME": "/tmp",
                                         "PYTHONPATH": ":".join(sys.path)})
    assert res.returncode == 0, res.stderr
    acc, n = form_accuracy(as_records(records))
    assert f"English train -> English test): {acc:.1%} accurate on {n}" in res.stdout
    count = collections.Counter((r["meta"]["split"], r["category"]) for r in records)
    assert (f"test benign {count['test', 'benign']}, harmful {count['test', 'harmful']}" in res.stdout)


def test_inspect_checks_flag_wrong_scripts_and_languages():
    from polyalign.data.checks import breakdown, language_checks

    recs = [ParallelRecord("a", {"th": "ฉันจะทำอาหารไทยได้อย่างไร", "sw": "Ninawezaje kupika wali mzuri nyumbani kwangu leo?"},
                           "benign", {"split": "test"}),
            ParallelRecord("b", {"th": "How do I cook rice at home?", "sw": "How do I cook rice well at home today?"},
                           "benign", {"split": "train"})]
    c = language_checks(recs)
    assert c["th"]["n"] == 2 and c["th"]["in_script"] == 1           # English text under th fails the script check
    assert c["sw"]["in_script"] == 2                                   # Latin either way ...
    assert c["sw"]["langid_agrees"] < c["sw"]["langid_confident"]      # ... but language ID sees the English one
    assert breakdown(recs)["split"] == {"test": 1, "train": 1}
