"""``polyalign data make-responses``: English responses written by the model itself.

Users often have multilingual prompts but no responses. The model's English safety is already
good, so its own greedy answer to the English prompt is a usable SFT target; the output is MLC's
SFT format (``instruction``, ``input``, ``output``, ``prompt_<lang>``). Generations are cached, so
an interrupted run resumes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from polyalign.data import load_source, parse_language_list, select_languages
from polyalign.data.records import ParallelRecord, atomic_write_text
from polyalign.errors import PolyalignError
from polyalign.eval.generation import (
    GenerationCache,
    GenerationSettings,
    GenRequest,
    HFGenerator,
    cache_key,
    generate_cached,
)


def make_responses(path: str, out: str | Path, model_spec: str, fmt: str | None = None,
                   languages: str | None = None, limit: int | None = None, max_new_tokens: int = 128,
                   batch_size: int = 32) -> int:
    from polyalign.models import load_model, load_tokenizer

    langs = parse_language_list(languages)
    records = select_languages(load_source(path, fmt), (["en", *langs] if langs and "en" not in langs else langs))
    records = [r for r in records if "en" in r.texts][: limit or None]
    if not records:
        raise PolyalignError(f"{path}: no records with an English prompt")
    out = Path(out)
    model, tok = load_model(model_spec), load_tokenizer(model_spec)
    answers = own_english_answers(model, tok, records, out.with_suffix(out.suffix + ".cache.jsonl"),
                                  max_new_tokens, batch_size)
    lines = []
    for r in records:
        item = {"id": r.id, "instruction": r.texts["en"], "input": "", "output": answers[r.id]}
        item.update({f"prompt_{lang}": t for lang, t in r.texts.items() if lang != "en"})
        lines.append(json.dumps(item, ensure_ascii=False))
    if out.suffix == ".json":
        atomic_write_text(out, "[\n" + ",\n".join(lines) + "\n]\n")
    else:
        atomic_write_text(out, "\n".join(lines) + "\n")
    return len(lines)


def own_english_answers(model: Any, tok: Any, records: list[ParallelRecord], cache_path: str | Path,
                        max_new_tokens: int = 128, batch_size: int = 32, fingerprint: str | None = None
                        ) -> dict[str, str]:
    """{record id: the model's greedy answer to the English prompt}, cached in ``cache_path`` (JSONL)."""
    from polyalign.models.loading import weights_fingerprint

    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    cache = GenerationCache(Path(cache_path))
    reqs = [GenRequest(r.id, "en", r.texts["en"]) for r in records]
    fingerprint = fingerprint or weights_fingerprint(model)
    rows, _, _ = generate_cached(HFGenerator(model, tok, batch_size), reqs, settings, cache, fingerprint)
    return {req.prompt_id: rows[cache_key(fingerprint, settings, req)]["response"] for req in reqs}
