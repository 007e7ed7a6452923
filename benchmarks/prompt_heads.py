"""How many of a recipe's prompt tokens are the shared head (issue #26): no timing, the tokenizer only.

    python benchmarks/prompt_heads.py                       # the demo's recipe on the 0.5B model's tokenizer
    python benchmarks/prompt_heads.py --model builtin:tiny-random

Prints, over the recipe's MSD training examples, the mean student and teacher prompt length in
tokens (overall and by language) and the tokens every prompt starts with
(:func:`polyalign.models.batching.shared_head_length`), which the fast step and evaluation run once
a batch instead of once a row.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--recipe", default="msd_selective")
    args = p.parse_args()

    from polyalign.models import load_tokenizer
    from polyalign.models.batching import shared_head_length
    from polyalign.train.msd_config import MSDConfig
    from polyalign.train.msd_trainer import MSDTrainer, build_msd_examples
    from polyalign.train.recipes import load_prompts, load_recipe

    r = load_recipe(args.recipe, [f"model={args.model}"])
    records = load_prompts(r.data.source, r.data.format, r.data.split, r.data.limit, r.data.category, r.seed)
    if r.data.benign_source:
        records = records + load_prompts(r.data.benign_source, None, r.data.split, r.data.benign_limit, seed=r.seed)
    cfg = MSDConfig(**r.msd)
    examples = build_msd_examples(records, cfg)
    trainer = MSDTrainer.__new__(MSDTrainer)          # only the prompt builders: no model, no Trainer state
    trainer.processing_class, trainer.msd = load_tokenizer(args.model), cfg
    student, teacher = trainer._prompts(examples)
    head = shared_head_length(student + teacher)
    by_lang: dict[str, list[int]] = defaultdict(list)
    for e, s in zip(examples, student, strict=True):
        by_lang[e["lang"]].append(len(s))
    print(f"# {args.recipe} on {args.model}'s tokenizer: {len(examples)} training examples")
    print(f"student prompt tokens: mean {statistics.mean(map(len, student)):.1f}, "
          f"teacher: mean {statistics.mean(map(len, teacher)):.1f}")
    print("student mean by language: " + ", ".join(f"{k} {statistics.mean(v):.0f}" for k, v in by_lang.items()))
    print(f"shared head: {head} tokens")


if __name__ == "__main__":
    main()
