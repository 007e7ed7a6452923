"""Text heuristics below every other layer: the language registry, script and language ID,
refusal phrases and invalid-output checks. Imports nothing from data, models, eval or train."""

from polyalign.text.langid import dominant_script, identify, in_language, script_shares
from polyalign.text.languages import (
    LANGUAGES,
    TIERS,
    Language,
    get_language,
    normalize_code,
    parse_language_list,
)
from polyalign.text.refusal import is_degenerate, is_echo, letters, refusal_phrase, wrong_script

__all__ = [
    "LANGUAGES", "TIERS", "Language", "dominant_script", "get_language", "identify", "in_language", "is_degenerate",
    "is_echo", "letters", "normalize_code", "parse_language_list", "refusal_phrase", "script_shares", "wrong_script",
]
