"""Language registry: ISO 639-1 code -> name, script and MultiJail resource tier.

Tiers follow MultiJail (METHODS.md section 3): high = en zh it vi, medium = ar ko th,
low = bn sw jv. Languages outside MultiJail get the tier their web-text share suggests.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from polyalign.errors import PolyalignError


@dataclass(frozen=True)
class Language:
    code: str     # ISO 639-1
    name: str
    script: str   # ISO 15924 of the usual script: Latn, Hani, Arab, Thai, Beng, ...
    tier: str     # "high" | "medium" | "low"


_LANGS = [
    Language("en", "English", "Latn", "high"),
    Language("zh", "Chinese", "Hani", "high"),
    Language("it", "Italian", "Latn", "high"),
    Language("vi", "Vietnamese", "Latn", "high"),
    Language("ar", "Arabic", "Arab", "medium"),
    Language("ko", "Korean", "Hang", "medium"),
    Language("th", "Thai", "Thai", "medium"),
    Language("bn", "Bengali", "Beng", "low"),
    Language("sw", "Swahili", "Latn", "low"),
    Language("jv", "Javanese", "Latn", "low"),
    Language("de", "German", "Latn", "high"),
    Language("fr", "French", "Latn", "high"),
    Language("es", "Spanish", "Latn", "high"),
    Language("ru", "Russian", "Cyrl", "high"),
    Language("ja", "Japanese", "Jpan", "high"),
    Language("hi", "Hindi", "Deva", "medium"),
    Language("ur", "Urdu", "Arab", "low"),
    Language("ps", "Pashto", "Arab", "low"),
    Language("ku", "Kurdish", "Arab", "low"),  # Sorani in Arabic script; MLC files also hold Latin Kurmanji
    Language("te", "Telugu", "Telu", "low"),
    Language("id", "Indonesian", "Latn", "medium"),
    Language("pt", "Portuguese", "Latn", "high"),
    Language("tr", "Turkish", "Latn", "medium"),
    Language("fa", "Persian", "Arab", "medium"),
]
LANGUAGES: dict[str, Language] = {lang.code: lang for lang in _LANGS}
# Non-standard codes seen in public data sets (XSafety calls Spanish "sp").
ALIASES = {"sp": "es", "cn": "zh", "jp": "ja", "kr": "ko", "zh-cn": "zh", "zh_cn": "zh"}
TIERS = ("high", "medium", "low")


def normalize_code(code: str) -> str:
    """Canonical ISO 639-1 code for ``code`` or a clear error naming the close matches."""
    c = code.strip().lower()
    c = ALIASES.get(c, c)
    if c not in LANGUAGES:
        close = difflib.get_close_matches(c, list(LANGUAGES), n=2)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise PolyalignError(f"unknown language code {code!r}; known: {' '.join(LANGUAGES)}.{hint}")
    return c


def get_language(code: str) -> Language:
    return LANGUAGES[normalize_code(code)]


def parse_language_list(spec: str | list[str] | None) -> list[str] | None:
    """``"th,sw, jv"`` or a list -> canonical codes (order kept, duplicates dropped)."""
    if spec is None:
        return None
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        if item.strip():
            c = normalize_code(item)
            if c not in out:
                out.append(c)
    return out
