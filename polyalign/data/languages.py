"""Old import path of :mod:`polyalign.text.languages` (moved in 0.1.1 so imports go one way); removed in 0.2."""

from polyalign.text.languages import (  # noqa: F401
    LANGUAGES,
    TIERS,
    Language,
    get_language,
    normalize_code,
    parse_language_list,
)
