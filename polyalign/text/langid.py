"""Offline language fidelity: is a response written in the query's language?

Two checks, because each alone fails: a script check (a Thai query answered in Latin letters is
wrong whatever the words) and, for languages that share a script (Latin: en sw jv vi de ...), the
py3langid classifier restricted to the languages polyalign knows. Very short texts (< 12 letters)
are judged by script alone.
"""

from __future__ import annotations

from functools import lru_cache

import regex

from polyalign.text.languages import LANGUAGES, get_language


def _script_pattern(scripts: tuple[str, ...]) -> regex.Pattern:
    """One alternation of named groups ``(?P<Thai>\\p{Script=Thai})|...`` over the given ISO 15924 codes."""
    return regex.compile("|".join(f"(?P<{s}>\\p{{Script={s}}})" for s in scripts))


def _registry_scripts() -> tuple[str, ...]:
    """Every script a registered language uses (Jpan = Hani + Hira + Kana), plus Latin."""
    out = {"Latn"}
    for lang in LANGUAGES.values():
        out |= {"Hani", "Hira", "Kana"} if lang.script == "Jpan" else {lang.script}
    return tuple(sorted(out))


@lru_cache(maxsize=8)
def _pattern(scripts: tuple[str, ...]) -> regex.Pattern:
    return _script_pattern(scripts)


def char_script(ch: str, pattern: regex.Pattern | None = None) -> str | None:
    """ISO 15924 script of one letter (Unicode's Script property; hiragana counts as ``Kana``),
    ``Other`` for a script no registered language uses, None for digits, punctuation and spaces."""
    if not ch.isalpha():
        return None
    m = (pattern or _pattern(_registry_scripts())).match(ch)
    if m is None:
        return "Other"
    return "Kana" if m.lastgroup == "Hira" else m.lastgroup


def script_shares(text: str) -> dict[str, float]:
    counts: dict[str, int] = {}
    pattern = _pattern(_registry_scripts())
    for ch in text:
        s = char_script(ch, pattern)
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


@lru_cache(maxsize=4)
def _identifier(codes: tuple[str, ...]):
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    supported = [c for c in codes if c in ident.nb_classes]
    ident.set_languages(supported)
    return ident


def identify(text: str) -> tuple[str, float]:
    """(language code, probability) from py3langid over the registry's languages."""
    lang, prob = _identifier(tuple(LANGUAGES)).classify(text)
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
