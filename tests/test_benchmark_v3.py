"""The built-in benchmark v2 (polyalign/resources/benchmark.jsonl): sizes, splits, categories,
provenance, parallel texts in every language, each in its language's script and, where the
language-ID model is confident, identified as its language."""

import collections
import json
from importlib import resources

import pytest
import regex

LANGS = ["en", "zh", "th", "ar", "sw", "bn", "ko", "vi", "jv"]
SCRIPT = {"en": "Latin", "zh": "Han", "th": "Thai", "ar": "Arabic", "sw": "Latin", "bn": "Bengali",
          "ko": "Hangul", "vi": "Latin", "jv": "Latin"}


@pytest.fixture(scope="module")
def records():
    text = (resources.files("polyalign") / "resources" / "benchmark.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def test_sizes_splits_and_categories(records):
    count = collections.Counter((r["category"], r["meta"]["split"]) for r in records)
    assert count["harmful", "eval"] >= 120 and count["benign", "eval"] >= 120
    assert count["harmful", "eval"] + count["harmful", "train"] >= 240
    assert count["benign", "eval"] + count["benign", "train"] >= 240
    harm = collections.Counter(r["meta"]["harm_category"] for r in records if r["category"] == "harmful")
    assert len(harm) >= 8 and min(harm.values()) >= 20
    for cat in harm:   # both splits cover every harm category
        splits = {r["meta"]["split"] for r in records if r["meta"].get("harm_category") == cat}
        assert splits == {"train", "eval"}, cat
    benign = [r for r in records if r["category"] == "benign"]
    assert sum(r["meta"]["borderline"] for r in benign) >= 80
    assert {r["meta"]["benign_type"] for r in benign} >= {"everyday", "math", "fact", "borderline"}
    assert all(r["meta"]["borderline"] is False for r in records if r["category"] == "harmful")
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))
    # train and eval never share a text in any language
    seen = {(lang, r["texts"][lang]) for r in records if r["meta"]["split"] == "train" for lang in LANGS}
    assert not any((lang, r["texts"][lang]) in seen for r in records if r["meta"]["split"] == "eval"
                   for lang in LANGS)


def test_provenance_and_maths_answers(records):
    for r in records:
        assert r["meta"]["license"] == "Apache-2.0" and r["meta"]["source"], r["id"]
        if r["meta"].get("benign_type") == "math":
            assert regex.fullmatch(r"-?\d+(\.\d+)?", r["meta"]["answer"]), r["id"]


def test_every_text_is_in_its_languages_script(records):
    for r in records:
        assert set(r["texts"]) == set(LANGS), r["id"]
        for lang, text in r["texts"].items():
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


def test_the_first_records_of_a_split_cover_every_category():
    """``--limit N`` takes the first N records: the loader interleaves harm categories / benign types."""
    from polyalign.data.builtin import builtin_benchmark

    harmful = builtin_benchmark("harmful", "eval")
    assert len({r.meta["harm_category"] for r in harmful[:10]}) == 10
    benign = builtin_benchmark("benign", "eval")
    assert {r.meta["benign_type"] for r in benign[:4]} == {"everyday", "math", "fact", "borderline"}
    assert sorted(r.id for r in harmful) == sorted(r.id for r in builtin_benchmark("harmful", "eval"))


def test_inspect_checks_flag_wrong_scripts_and_languages():
    from polyalign.data.checks import breakdown, language_checks
    from polyalign.data.records import ParallelRecord

    recs = [ParallelRecord("a", {"th": "ฉันจะทำอาหารไทยได้อย่างไร", "sw": "Ninawezaje kupika wali mzuri nyumbani kwangu leo?"},
                           "benign", {"split": "eval"}),
            ParallelRecord("b", {"th": "How do I cook rice at home?", "sw": "How do I cook rice well at home today?"},
                           "benign", {"split": "train"})]
    c = language_checks(recs)
    assert c["th"]["n"] == 2 and c["th"]["in_script"] == 1           # English text under th fails the script check
    assert c["sw"]["in_script"] == 2                                   # Latin either way ...
    assert c["sw"]["langid_agrees"] < c["sw"]["langid_confident"]      # ... but language ID sees the English one
    assert breakdown(recs)["split"] == {"eval": 1, "train": 1}
