"""What ``polyalign data inspect`` reports about a parallel set: per language, how many texts are
written in the language's script and, where the language-ID model is confident, identified as the
language; and the record counts by split, category, harm category, benign type and borderline."""

from __future__ import annotations

from collections import Counter
from typing import Any

from polyalign.data.records import ParallelRecord
from polyalign.text import get_language, identify, script_shares
from polyalign.text.languages import LANGUAGES

CONFIDENT = 0.9     # language-ID probability above which its answer is taken as a check


def in_own_script(text: str, lang: str) -> bool:
    """Letters mostly in the language's script (Latin letters such as 'Python' or 'x' are allowed
    beside a non-Latin script, never instead of it)."""
    shares = script_shares(text)
    if not shares:
        return True                     # digits and punctuation only
    script = get_language(lang).script
    if script == "Jpan":
        return shares.get("Hani", 0) + shares.get("Kana", 0) >= 0.5
    if script == "Latn":
        return shares.get("Latn", 0) >= 0.95
    own, latin = shares.get(script, 0), shares.get("Latn", 0)
    return own >= 0.2 and own >= 0.95 * (1 - latin)


def language_checks(records: list[ParallelRecord]) -> dict[str, dict[str, int]]:
    """Per language: n, in_script, langid_confident (prob >= CONFIDENT), langid_agrees (of those)."""
    out: dict[str, dict[str, int]] = {}
    for r in records:
        for lang, text in r.texts.items():
            row = out.setdefault(lang, {"n": 0, "in_script": 0, "langid_confident": 0, "langid_agrees": 0})
            row["n"] += 1
            row["in_script"] += in_own_script(text, lang)
            if lang in LANGUAGES:
                guess, prob = identify(text)
                if prob >= CONFIDENT:
                    row["langid_confident"] += 1
                    row["langid_agrees"] += guess == lang or guess in get_language(lang).related
    return out


def breakdown(records: list[ParallelRecord]) -> dict[str, Counter]:
    """Record counts by split, category and the built-in benchmark's meta fields (where present)."""
    keys: dict[str, Any] = {"split": lambda r: r.meta.get("split"), "category": lambda r: r.category,
                            "harm_category": lambda r: r.meta.get("harm_category"),
                            "benign_type": lambda r: r.meta.get("benign_type"),
                            "borderline": lambda r: r.meta.get("borderline")}
    out = {}
    for name, key in keys.items():
        c = Counter(key(r) for r in records if key(r) is not None)
        if c:
            out[name] = c
    return out
