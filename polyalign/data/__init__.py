"""Multilingual data layer: canonical parallel records, language registry, loaders, splits."""

from polyalign.data.loaders import LOADERS, detect_format, load_source
from polyalign.data.records import (
    ParallelRecord,
    read_records,
    select_languages,
    split_of,
    split_records,
    write_records,
)
from polyalign.text.languages import LANGUAGES, Language, get_language, normalize_code, parse_language_list

__all__ = [
    "LANGUAGES", "LOADERS", "Language", "ParallelRecord", "detect_format", "get_language", "load_source",
    "normalize_code", "parse_language_list", "read_records", "select_languages", "split_of",
    "split_records", "write_records",
]
