"""Multilingual prompt variants from English: ``polyalign data translate``.

Translators are pluggable (:func:`build_translator`):
  * ``openai:MODEL@BASE_URL`` — an OpenAI-compatible chat endpoint (key from $POLYALIGN_API_KEY,
    never logged) with the MSD paper's translation prompt, JSON output, retries and rate limit;
  * ``seq2seq:SPEC`` — a local NLLB-200 / M2M-100 model (language codes mapped);
  * ``chat:SPEC`` — a local chat LLM with the same prompt as the endpoint.

Every finished translation is appended to ``OUT.progress.jsonl``; a rerun skips what is there
(nothing translated twice, nothing lost on a crash). Refusals, empty, untranslated (same as the
source) and wrong-language outputs are flagged and kept out of the parallel file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from polyalign.cache import JsonlCache
from polyalign.data.records import ParallelRecord, atomic_write_text, write_records
from polyalign.errors import PolyalignError
from polyalign.text.languages import get_language, parse_language_list

TRANSLATE_SYSTEM = (
    "You are a professional translation engine. Translate the user's text from {src} into {tgt}. "
    "Keep the original formatting (line breaks, lists, code, placeholders). Do not censor, summarise, "
    "answer or add anything: translate the text exactly, even if it asks for something harmful. "
    'Output only JSON of the form {{"translated": "<the translation>"}}.'
)


class Translator(Protocol):
    name: str

    def translate(self, text: str, src: str, tgt: str) -> str: ...


def parse_translation(answer: str) -> str | None:
    """``{"translated": ...}`` from a chat answer: tolerates code fences, prose around the JSON and
    unescaped quotes; None when nothing usable is there."""
    text = re.sub(r"^```(?:json)?|```$", "", answer.strip(), flags=re.M).strip()
    start, end = text.find("{"), text.rfind("}")
    if start != -1 and end > start:
        try:
            obj = json.loads(text[start:end + 1])
            if isinstance(obj, dict) and isinstance(obj.get("translated"), str):
                return obj["translated"]
        except json.JSONDecodeError:
            pass
    m = re.search(r'"translated"\s*:\s*"(.*)"\s*}?\s*$', text, flags=re.S)
    return m.group(1).replace('\\"', '"').replace("\\n", "\n") if m else None


class ChatTranslator:
    """Any chat backend (endpoint or local model) with the translation prompt."""

    def __init__(self, backend: Any, name: str):
        self.backend, self.name = backend, name

    def translate(self, text: str, src: str, tgt: str) -> str:
        system = TRANSLATE_SYSTEM.format(src=get_language(src).name, tgt=get_language(tgt).name)
        answer = self.backend.complete(system, json.dumps({"text": text}, ensure_ascii=False))
        parsed = parse_translation(answer)
        if parsed is None:
            raise MalformedOutput(answer)
        return parsed


class MalformedOutput(Exception):
    """The translator answered, but not with the JSON asked for."""


class Seq2SeqTranslator:
    """NLLB-200 / M2M-100 style models: source language on the tokenizer, target as forced BOS."""

    def __init__(self, spec: str, max_new_tokens: int = 512):
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        from polyalign.models.loading import resolve_spec

        loc = resolve_spec(spec).location
        self.tok = AutoTokenizer.from_pretrained(loc)
        self.model = AutoModelForSeq2SeqLM.from_pretrained(loc, use_safetensors=True).eval()
        self.name, self.max_new_tokens = f"seq2seq:{spec}", max_new_tokens
        self.nllb = "nllb" in type(self.tok).__name__.lower() or "nllb" in loc.lower()

    def code(self, lang: str) -> str:
        return get_language(lang).nllb if self.nllb else lang

    def translate(self, text: str, src: str, tgt: str) -> str:
        import torch

        self.tok.src_lang = self.code(src)
        enc = self.tok(text, return_tensors="pt")
        bos = self.tok.convert_tokens_to_ids(self.code(tgt)) if self.nllb else self.tok.get_lang_id(tgt)
        with torch.no_grad():
            out = self.model.generate(**enc, forced_bos_token_id=bos, max_new_tokens=self.max_new_tokens)
        return self.tok.decode(out[0], skip_special_tokens=True)


def build_translator(spec: str) -> Translator:
    from polyalign.models.backends import HFChat, OpenAIChat

    kind, _, rest = spec.partition(":")
    if kind == "openai":
        model, _, base = rest.partition("@")
        if not base:
            raise PolyalignError("translator spec: openai:MODEL@BASE_URL (key in $POLYALIGN_API_KEY)")
        return ChatTranslator(OpenAIChat(model, base), f"openai:{model}")
    if kind == "seq2seq":
        return Seq2SeqTranslator(rest)
    if kind == "chat":
        return ChatTranslator(HFChat(rest, max_new_tokens=512), spec)
    raise PolyalignError(f"unknown translator {spec!r}; use openai:MODEL@URL, seq2seq:SPEC or chat:SPEC")


# ------------------------------------------------------------------------------------ checks

def flag_translation(source: str, output: str, tgt: str) -> str | None:
    """Why a translation must not be used, or None: refusal | empty | untranslated | wrong-language."""
    from polyalign.text.langid import in_language
    from polyalign.text.refusal import letters, refusal_phrase

    if not output.strip():
        return "empty"
    if letters(output) == letters(source):
        return "untranslated"
    if refusal_phrase(output, tgt) and not refusal_phrase(source, "en"):
        return "refusal"
    if not in_language(output, tgt):
        return "wrong-language"
    return None


def chrf(a: str, b: str, n: int = 3) -> float:
    """Character n-gram F1 (a small chrF): round-trip similarity of a back-translation."""
    def grams(s: str) -> dict[str, int]:
        s = re.sub(r"\s+", " ", s.lower().strip())
        out: dict[str, int] = {}
        for i in range(len(s) - n + 1):
            out[s[i:i + n]] = out.get(s[i:i + n], 0) + 1
        return out
    ga, gb = grams(a), grams(b)
    if not ga or not gb:
        return 0.0
    overlap = sum(min(c, gb.get(g, 0)) for g, c in ga.items())
    p, r = overlap / sum(gb.values()), overlap / sum(ga.values())
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


# ------------------------------------------------------------------------------------ driver

@dataclass
class TranslateReport:
    languages: dict[str, dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"languages": self.languages}


def _progress_key(row: dict[str, Any]) -> str:
    return json.dumps([row["id"], row["lang"]])


def translate_records(records: list[ParallelRecord], targets: list[str] | str, translator: Translator,
                      out: str | Path, back_translator: Translator | None = None, source_lang: str = "en",
                      progress: Callable[[int, int], None] | None = None) -> TranslateReport:
    """Translate each record's ``source_lang`` text into ``targets``; write ``out`` (canonical
    parallel JSONL, flagged translations left out), ``out.progress.jsonl`` and ``out.report.json``."""
    targets = parse_language_list(targets) or []
    out = Path(out)
    log_path = out.with_name(out.name + ".progress.jsonl")
    log = JsonlCache(log_path, key_of=_progress_key)
    todo = [(r, t) for r in records if source_lang in r.texts for t in targets
            if _progress_key({"id": r.id, "lang": t}) not in log]
    for i, (r, tgt) in enumerate(todo):
        src_text = r.texts[source_lang]
        try:
            text = translator.translate(src_text, source_lang, tgt)
            flag = flag_translation(src_text, text, tgt)
        except MalformedOutput as e:
            text, flag = str(e)[:500], "malformed"
        row = {"id": r.id, "lang": tgt, "text": text, "flag": flag}
        if back_translator is not None and flag is None:
            row["back"] = back_translator.translate(text, tgt, source_lang)
            row["roundtrip_chrf"] = chrf(src_text, row["back"])
        log.add([row])
        if progress:
            progress(i + 1, len(todo))
    done = {(row["id"], row["lang"]): row for row in log.rows.values()}
    parallel = []
    for r in records:
        texts = dict(r.texts)
        flags = {}
        for tgt in targets:
            row = done.get((r.id, tgt))
            if row and row["flag"] is None:
                texts[tgt] = row["text"]
            elif row:
                flags[tgt] = row["flag"]
        parallel.append(ParallelRecord(r.id, texts, r.category, {**r.meta, **({"flags": flags} if flags else {})}))
    write_records(out, parallel)
    report = TranslateReport(quality_report(records, targets, done, source_lang))
    atomic_write_text(out.with_name(out.name + ".report.json"), json.dumps(report.to_json(), indent=1))
    return report


def quality_report(records: list[ParallelRecord], targets: list[str], done: dict, source_lang: str) -> dict:
    by_id = {r.id: r for r in records}
    rep: dict[str, dict[str, Any]] = {}
    for tgt in targets:
        rows = [row for (rid, lang), row in done.items() if lang == tgt and rid in by_id]
        good = [row for row in rows if row["flag"] is None]
        kinds: dict[str, int] = {}
        for row in rows:
            if row["flag"]:
                kinds[row["flag"]] = kinds.get(row["flag"], 0) + 1
        ratios = [len(row["text"]) / max(1, len(by_id[row["id"]].texts[source_lang])) for row in good]
        rt = [row["roundtrip_chrf"] for row in good if "roundtrip_chrf" in row]
        rep[tgt] = {"n": len(rows), "flagged": (len(rows) - len(good)) / len(rows) if rows else 0.0,
                    "flags": kinds, "length_ratio": sum(ratios) / len(ratios) if ratios else None,
                    "roundtrip_chrf": sum(rt) / len(rt) if rt else None}
    return rep
