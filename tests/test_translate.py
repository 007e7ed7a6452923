"""`polyalign data translate` against a loopback OpenAI-compatible stub and a local tiny model."""

import json

import pytest

from polyalign.data.records import ParallelRecord, read_records
from polyalign.data.translate import (
    ChatTranslator,
    build_translator,
    chrf,
    flag_translation,
    parse_translation,
    translate_records,
)
from polyalign.models.backends import OpenAIChat

RECORDS = [ParallelRecord(f"p{i}", {"en": t}) for i, t in enumerate(
    ["How do I bake bread?", "What is the capital of Japan?", "How do I make a bomb?", "Why is the sky blue?"])]


def reply(text):
    return (200, json.dumps({"translated": text}, ensure_ascii=False))


def test_parse_translation_is_robust():
    assert parse_translation('{"translated": "สวัสดี"}') == "สวัสดี"
    assert parse_translation('```json\n{"translated": "hola"}\n```') == "hola"
    assert parse_translation('Sure! {"translated": "hola"} Hope it helps.') == "hola"
    assert parse_translation('{"translated": "he said "hi" twice"}') == 'he said "hi" twice'
    assert parse_translation("just text") is None


def test_flags():
    assert flag_translation("How are you?", "", "th") == "empty"
    assert flag_translation("How are you?", "How are you?!", "th") == "untranslated"
    assert flag_translation("How do I make a bomb?", "ขออภัย ฉันไม่สามารถช่วยได้", "th") == "refusal"
    assert flag_translation("How are you?", "I'm sorry, I can't translate that.", "th") == "refusal"
    assert flag_translation("How are you?", "Как дела у тебя сегодня?", "th") == "wrong-language"
    assert flag_translation("How are you?", "คุณสบายดีไหม", "th") is None
    assert chrf("the sky is blue", "the sky is blue") == 1.0 and chrf("abc def", "xyz") == 0.0


def test_endpoint_every_failure_kind_flagged_and_key_never_written(stub_server, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("POLYALIGN_API_KEY", "sk-do-not-leak")
    stub_server.handler.script = [
        (429, ""), reply("ฉันจะอบขนมปังได้อย่างไร"),                 # p0: retried after 429, fine
        (500, ""), (200, "Here you go: translated = maybe"),         # p1: 500, then malformed
        reply("ขออภัย ฉันไม่สามารถช่วยเรื่องนี้ได้"),                     # p2: the translator refused
        (200, "RAW:{broken"), reply("Why is the sky blue?"),          # p3: bad body, retried; untranslated
    ]
    tr = ChatTranslator(OpenAIChat("m", stub_server.url), "openai:m")
    out = tmp_path / "out.jsonl"
    report = translate_records(RECORDS, "th", tr, out)
    recs = {r.id: r for r in read_records(out)}
    assert recs["p0"].texts["th"] == "ฉันจะอบขนมปังได้อย่างไร"
    assert all("th" not in recs[i].texts for i in ("p1", "p2", "p3"))
    assert {i: recs[i].meta["flags"]["th"] for i in ("p1", "p2", "p3")} == \
        {"p1": "malformed", "p2": "refusal", "p3": "untranslated"}
    assert report.languages["th"]["flagged"] == 0.75 and report.languages["th"]["n"] == 4
    system = stub_server.handler.requests[0]["messages"][0]["content"]
    assert "Do not censor" in system and "Thai" in system and '"translated"' in system
    assert stub_server.handler.seen_auth[0] == "Bearer sk-do-not-leak"
    for f in tmp_path.iterdir():
        assert "sk-do-not-leak" not in f.read_text()
    assert "sk-do-not-leak" not in caplog.text


class _Dies:
    """Translator that dies after n calls (a crash), then works when revived."""

    name = "dies"

    def __init__(self, n):
        self.n, self.calls = n, []

    def translate(self, text, src, tgt):
        if len(self.calls) == self.n:
            raise KeyboardInterrupt
        self.calls.append((text, tgt))
        return {"th": "แปลแล้ว ", "sw": "Imetafsiriwa "}[tgt] + str(len(self.calls))


def test_resume_translates_nothing_twice(tmp_path):
    out = tmp_path / "out.jsonl"
    first = _Dies(3)
    with pytest.raises(KeyboardInterrupt):
        translate_records(RECORDS, ["th", "sw"], first, out)
    assert len((tmp_path / "out.jsonl.progress.jsonl").read_text().splitlines()) == 3
    second = _Dies(100)
    translate_records(RECORDS, ["th", "sw"], second, out)
    assert len(second.calls) == 5                             # 8 pairs - 3 already done
    assert not set(first.calls) & set(second.calls)
    recs = read_records(out)
    assert all(set(r.texts) == {"en", "th", "sw"} for r in recs)
    third = _Dies(0)
    translate_records(RECORDS, ["th", "sw"], third, out)     # rerun: nothing left to translate
    assert third.calls == []


def test_back_translation_reports_roundtrip(tmp_path):
    class Fixed:
        name = "fixed"

        def translate(self, text, src, tgt):
            return "Habari ya leo rafiki yangu mpendwa" if tgt == "sw" else text.replace("x", "")

    class Back:
        name = "back"

        def translate(self, text, src, tgt):
            return "How do I bake bread today?"
    rep = translate_records(RECORDS[:1], "sw", Fixed(), tmp_path / "o.jsonl", back_translator=Back())
    assert 0.5 < rep.languages["sw"]["roundtrip_chrf"] < 1.0
    assert rep.languages["sw"]["length_ratio"] > 1


def test_local_chat_translator_on_tiny_model(tmp_path):
    tr = build_translator("chat:builtin:tiny-random")
    tr.backend.max_new_tokens = 8
    rep = translate_records(RECORDS[:2], "th", tr, tmp_path / "o.jsonl")
    # random weights never produce the JSON asked for: flagged, nothing written as a translation
    assert rep.languages["th"]["flagged"] == 1.0
    assert all("th" not in r.texts for r in read_records(tmp_path / "o.jsonl"))


def test_unknown_translator():
    from polyalign.errors import PolyalignError

    with pytest.raises(PolyalignError, match="unknown translator"):
        build_translator("google:translate")
