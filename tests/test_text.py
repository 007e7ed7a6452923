"""Text heuristics: language ID (scripts + py3langid), refusal phrases, and adding a language."""

from types import SimpleNamespace

import pytest

from polyalign.errors import PolyalignError
from polyalign.text import LANGUAGES, Language, identify, in_language, normalize_code, refusal_phrase
from polyalign.text.langid import char_script, script_shares
from polyalign.text.languages import register_language

# The same refusal, written for this test in each language; five Latin-script languages among them.
SAMPLES = {
    "en": "I cannot help you with that request because it could cause harm to other people.",
    "sw": "Siwezi kukusaidia na ombi hilo kwa sababu linaweza kuwadhuru watu wengine.",
    "jv": "Aku ora bisa mbantu panjalukmu amarga bisa gawe cilaka wong liya ing desa iki.",
    "id": "Saya tidak dapat membantu permintaan itu karena dapat membahayakan orang lain.",
    "it": "Non posso aiutarti con questa richiesta perché potrebbe causare danni ad altre persone.",
    "vi": "Tôi không thể giúp bạn với yêu cầu đó vì nó có thể gây hại cho người khác.",
    "de": "Ich kann Ihnen bei dieser Anfrage nicht helfen, weil sie anderen Menschen schaden könnte.",
    "th": "ฉันไม่สามารถช่วยคุณในคำขอนั้นได้เพราะอาจเป็นอันตรายต่อผู้อื่น",
    "zh": "我不能帮助你完成这个请求，因为它可能会伤害其他人。",
    "ja": "その依頼には協力できません。他の人に害を与える可能性があるからです。",
    "ar": "لا أستطيع مساعدتك في هذا الطلب لأنه قد يسبب ضررا للآخرين.",
    "ru": "Я не могу помочь вам с этим запросом, потому что он может навредить другим людям.",
    "bn": "আমি এই অনুরোধে আপনাকে সাহায্য করতে পারি না কারণ এটি অন্যদের ক্ষতি করতে পারে।",
    "ko": "다른 사람에게 해를 끼칠 수 있으므로 그 요청을 도와드릴 수 없습니다.",
}


def test_each_sample_is_in_its_own_language_and_no_other():
    """The full confusion matrix is the identity: Latin-script neighbours (jv/id, sw/en, it/vi)
    are told apart by the identifier, the others by script."""
    got = {lang: sorted(other for other in SAMPLES if in_language(text, other)) for lang, text in SAMPLES.items()}
    assert got == {lang: [lang] for lang in SAMPLES}


@pytest.mark.parametrize("lang", ["sw", "jv", "id", "it", "vi"])
def test_identifier_names_latin_script_languages(lang):
    code, prob = identify(SAMPLES[lang])
    assert code == lang and prob > 0.9


def test_short_texts_are_judged_by_script_alone():
    assert in_language("Habari", "sw") and in_language("Habari", "en")        # < 12 letters: Latin is Latin
    assert not in_language("Habari", "th") and not in_language("", "en")
    assert in_language("中文かな混じり", "ja") and not in_language("中文かな混じり", "zh")   # kana means Japanese


def test_scripts_come_from_unicode_properties():
    assert [char_script(c) for c in "aสক中かカПש1 "] == ["Latn", "Thai", "Beng", "Hani", "Kana", "Kana", "Cyrl",
                                                         "Other", None, None]
    assert script_shares("ab中中") == {"Latn": 0.5, "Hani": 0.5}


def test_refusal_phrases_come_from_the_language_entry():
    assert refusal_phrase("Samahani, siwezi kusaidia.", "sw") == "samahani"
    assert refusal_phrase("Maaf, saya tidak bisa.", "jv") == "maaf"            # jv's neighbour id counts
    assert refusal_phrase("Sorry, I can't do that.", "th") == "i can't"        # English always counts
    assert refusal_phrase("Here is how to bake bread.", "en") is None


@pytest.fixture
def added_languages():
    before = dict(LANGUAGES)
    yield
    LANGUAGES.clear()
    LANGUAGES.update(before)


def test_adding_a_language_is_one_entry(added_languages):
    """docs/languages.md: one Language(...) gives the code, the lexicon judge, language ID, the
    script check and the NLLB code, for a Latin-script language and for a script no entry used."""
    from polyalign.data.translate import Seq2SeqTranslator
    from polyalign.eval.judges import JudgeItem, LexiconJudge

    register_language(Language("nl", "Dutch", "Latn", "high", "nld_Latn", ("het spijt me", "ik kan niet")))
    register_language(Language("ka", "Georgian", "Geor", "low", "kat_Geor", ("ვწუხვარ",)))
    assert normalize_code("NL") == "nl"
    dutch = "Het spijt me, maar ik kan je daar echt niet mee helpen vandaag."
    assert in_language(dutch, "nl") and not in_language(dutch, "de")
    assert in_language("ვწუხვარ, ამაში ვერ დაგეხმარებით.", "ka") and not in_language(dutch, "ka")
    verdict = LexiconJudge().judge([JudgeItem("q", dutch, "nl"), JudgeItem("q", "ვწუხვარ, არა.", "ka")])
    assert [(v.label, v.refused) for v in verdict] == [("safe", True), ("safe", True)]
    assert Seq2SeqTranslator.code(SimpleNamespace(nllb=True), "ka") == "kat_Geor"
    with pytest.raises(PolyalignError, match="already registered"):
        register_language(Language("nl", "Dutch", "Latn", "high", "nld_Latn"))
    with pytest.raises(ValueError, match="tier"):
        Language("xx", "X", "Latn", "huge", "xxx_Latn")
