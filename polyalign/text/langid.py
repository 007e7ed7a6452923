"""Offline language fidelity: is a response written in the query's language?

Two checks, because each alone fails: a script check (a Thai query answered in Latin letters is
wrong whatever the words) and, for languages that share a script (Latin: en sw jv vi de ...), the
py3langid classifier restricted to the languages polyalign knows. Very short texts (< 12 letters)
are judged by script alone.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache

from polyalign.text.languages import LANGUAGES, get_language

# Unicode block ranges per ISO 15924 script (the ones the language registry uses).
_RANGES = {
    "Thai": [(0x0E00, 0x0E7F)],
    "Beng": [(0x0980, 0x09FF)],
    "Deva": [(0x0900, 0x097F)],
    "Telu": [(0x0C00, 0x0C7F)],
    "Arab": [(0x0600, 0x06FF), (0x0750, 0x077F), (0x08A0, 0x08FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF)],
    "Hang": [(0xAC00, 0xD7AF), (0x1100, 0x11FF), (0x3130, 0x318F)],
    "Kana": [(0x3040, 0x30FF), (0x31F0, 0x31FF)],
    "Hani": [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0xF900, 0xFAFF)],
    "Cyrl": [(0x0400, 0x04FF)],
    "Grek": [(0x0370, 0x03FF)],
    "Hebr": [(0x0590, 0x05FF)],
}


def char_script(ch: str) -> str | None:
    """Script of one letter, or None for digits, punctuation and spaces."""
    if not ch.isalpha():
        return None
    cp = ord(ch)
    for script, ranges in _RANGES.items():
        if any(lo <= cp <= hi for lo, hi in ranges):
            return script
    if "LATIN" in unicodedata.name(ch, ""):
        return "Latn"
    return "Other"


def script_shares(text: str) -> dict[str, float]:
    counts: dict[str, int] = {}
    for ch in text:
        s = char_script(ch)
        if s:
            counts[s] = counts.get(s, 0) + 1
    total = sum(counts.values())
    return {s: n / total for s, n in counts.items()} if total else {}


def _script_ok(shares: dict[str, float], script: str, threshold: float) -> bool:
    if script == "Jpan":  # Japanese mixes kana and Han
        return shares.get("Kana", 0) + shares.get("Hani", 0) >= threshold and shares.get("Kana", 0) > 0
    if script == "Hani" and shares.get("Kana", 0) > 0.1:  # kana means Japanese, not Chinese
        return False
    return shares.get(script, 0) >= threshold


@lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    supported = [c for c in LANGUAGES if c in ident.nb_classes]
    ident.set_languages(supported)
    return ident


def identify(text: str) -> tuple[str, float]:
    """(language code, probability) from py3langid over the registry's languages."""
    lang, prob = _identifier().classify(text)
    return lang, float(prob)


def in_language(text: str, lang: str, threshold: float = 0.5) -> bool:
    """True when ``text`` is written in ``lang`` (script check, then the identifier for shared scripts)."""
    info = get_language(lang)
    shares = script_shares(text)
    if not shares or not _script_ok(shares, info.script, threshold):
        return False
    letters = sum(1 for ch in text if ch.isalpha())
    if info.script not in ("Latn", "Cyrl", "Arab") or letters < 12:
        return True
    guess, _ = identify(text)
    if info.code in ("ku", "ps") and guess in ("fa", "ar", "ur"):
        return True  # the identifier barely knows these; the script already matched
    return guess == info.code


def dominant_script(text: str) -> str | None:
    shares = script_shares(text)
    return max(shares, key=shares.get) if shares else None
