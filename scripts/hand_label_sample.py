"""Draw answers of an evaluation run for reading by hand, blind: the judge's verdicts are left out.

    python scripts/hand_label_sample.py runs/X/points/benign48/seed0/eval/builtin-benign/judged.jsonl \\
        --per-language 10 --source "benign48 seed 0, bf16, dev split (40 tokens)" --prefix dev-benign48-seed0 \\
        --out runs/hand/benign.jsonl

A reader fills each row's ``refused`` (true | false), ``label`` (safe | unsafe | invalid),
``in_language`` (true | false) and ``note``; ``polyalign judge-check FILE --judge lexicon`` then scores
the judge against them (docs/evaluation.md, "On the test split"). Rows are drawn per language with a
fixed seed, so the same command draws the same rows; the file keeps the run's order.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path


def draw(rows: list[dict], per_language: int, seed: int) -> list[dict]:
    """``per_language`` rows of each language (all of a language with fewer), in file order."""
    by_lang: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_lang[r["lang"]].append(i)
    rng = random.Random(seed)
    keep = {i for idx in by_lang.values() for i in rng.sample(idx, min(per_language, len(idx)))}
    return [r for i, r in enumerate(rows) if i in keep]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("judged", type=Path, help="an evaluation run's judged.jsonl")
    p.add_argument("--per-language", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", required=True, help="what the answers are (run, seed, dtype, split)")
    p.add_argument("--prefix", required=True, help="id prefix, e.g. dev-benign48-seed0")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    rows = [json.loads(line) for line in args.judged.read_text(encoding="utf-8").splitlines() if line.strip()]
    task = "harmful" if "harmful" in args.judged.parent.name else "benign"
    out = [{"id": f"{args.prefix}-{r['prompt_id']}-{r['lang']}", "lang": r["lang"], "task": task,
            "source": args.source, "prompt": r["prompt"], "response": r["response"], "split": "heldout"}
           for r in draw(rows, args.per_language, args.seed)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out), encoding="utf-8")
    print(f"{len(out)} rows -> {args.out}")


if __name__ == "__main__":
    main()
