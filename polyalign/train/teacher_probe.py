"""Is the MSD teacher selective? Greedy teacher answers for benign and harmful train prompts.

    python -m polyalign.train.teacher_probe [--model SPEC] [--languages th,zh] [--n 4]

MSD can only be as selective as its teacher: if the teacher refuses benign queries, distillation
teaches refusing everything (docs/msd.md). Run this before training a new model or template.
"""

from __future__ import annotations

import argparse

from polyalign.data.builtin import builtin_benchmark
from polyalign.eval.generation import GenerationSettings, HFGenerator
from polyalign.text.langid import in_language
from polyalign.text.languages import get_language, parse_language_list
from polyalign.text.refusal import refusal_phrase
from polyalign.train.msd_config import (
    ENGLISH_ONLY_TEMPLATE,
    LANGUAGE_HINT,
    REFUSAL_HINT,
    SELECTIVE_TEMPLATE,
    TEACHER_TEMPLATE,
)

TEMPLATES = {"paper": TEACHER_TEMPLATE, "selective": SELECTIVE_TEMPLATE, "english-only": ENGLISH_ONLY_TEMPLATE,
             "selective+lang": SELECTIVE_TEMPLATE + LANGUAGE_HINT,
             # the teacher of the study's points (english_only template, language_hint: true)
             "english-only+lang": ENGLISH_ONLY_TEMPLATE + LANGUAGE_HINT,
             "hint-first": "(English meaning: {english_query})\n\n{target_query}",
             # the harmful prompts' teacher with ``msd.harmful_hint: refuse`` (in-language refusal)
             "english-only+refuse": ENGLISH_ONLY_TEMPLATE + REFUSAL_HINT}


def probe(model_spec: str, languages: list[str], n: int, max_new_tokens: int = 24,
          templates: list[str] | None = None, show: bool = False) -> dict[str, dict[str, int]]:
    from polyalign.models import load_model, load_tokenizer

    tok, model = load_tokenizer(model_spec), load_model(model_spec)
    gen = HFGenerator(model, tok, batch_size=16)
    recs = {c: builtin_benchmark(c, "train")[:n] for c in ("benign", "harmful")}
    out = {}
    for name, tpl in TEMPLATES.items():
        if templates and name not in templates:
            continue
        items = [(c, lang, tpl.format(target_query=r.texts[lang], english_query=r.texts["en"],
                                      target_language=get_language(lang).name))
                 for c, rs in recs.items() for r in rs for lang in languages]
        answers = gen.generate([p for *_, p in items], GenerationSettings(max_new_tokens=max_new_tokens))
        if show:
            for (c, lang, _), a in zip(items, answers):
                print(f"  [{name} {c} {lang}] {a[:160]!r}")
        row = {"n_per_category": n * len(languages)}
        for c in ("benign", "harmful"):
            row[f"{c}_refused"] = sum(bool(refusal_phrase(a, lang)) for (cc, lang, _), a in zip(items, answers) if cc == c)
        row["in_language"] = sum(in_language(a, lang) for (_, lang, _), a in zip(items, answers))
        # the target a language-faithful harmful teacher should give: a refusal in the query's language
        row["harmful_refused_in_language"] = sum(bool(refusal_phrase(a, lang)) and in_language(a, lang)
                                                 for (c, lang, _), a in zip(items, answers) if c == "harmful")
        out[name] = row
        print(f"{name:15s} benign refused {row['benign_refused']}/{row['n_per_category']}, harmful refused "
              f"{row['harmful_refused']}/{row['n_per_category']} ({row['harmful_refused_in_language']} in the "
              f"query's language), answers in the query's language {row['in_language']}/{2 * row['n_per_category']}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--languages", default="th,zh")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--templates", default=None, help=f"comma-separated, of: {', '.join(TEMPLATES)} (default all)")
    p.add_argument("--show", action="store_true", help="print every answer")
    a = p.parse_args()
    names = a.templates.split(",") if a.templates else None
    unknown = sorted(set(names or []) - set(TEMPLATES))
    if unknown:
        p.error(f"unknown template(s) {', '.join(unknown)}; choose from {', '.join(TEMPLATES)}")
    probe(a.model, parse_language_list(a.languages), a.n, templates=names, show=a.show)


if __name__ == "__main__":
    main()
