"""Quality guard for the dtype policy: the same greedy evaluation in fp32 and in bf16, and the share
of prompts whose verdict (safe / unsafe / invalid and refused) is the same, per language.

    python benchmarks/bf16_quality.py --model builtin:qwen2.5-coder-0.5b-instruct --limit 24
    python benchmarks/bf16_quality.py --split test --limit 0 --batch-size 32     # the study's settings

Runs evaluation's own path (run_eval on the built-in benchmark's ``--split``, harmful and benign)
into ``--out/<dtype>/<task>``, so a rerun reuses every generation. Besides the per-language
agreement it prints each dtype's refusal rates (what the study reports). To compare with a run on
another machine, export both (``scripts/study_tables.py export``) and pair them with
``scripts/study_tables.py agreement A.jsonl B.jsonl``. Where the hardware emulates bf16
(no AVX512-BF16 / AMX, no CUDA) bf16 is ~100x slower than fp32 and the policy never picks it;
``--force`` runs it anyway.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def main() -> None:
    from polyalign.eval.runner import EvalConfig, run_eval
    from polyalign.models.loading import default_dtype

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--languages", default="en,zh,th,ar,sw,bn,ko,vi,jv")
    p.add_argument("--split", default="dev", help="train | dev | test (default dev)")
    p.add_argument("--limit", type=int, default=24, help="prompts per language and task; 0: every one")
    p.add_argument("--batch-size", type=int, default=None, help="evaluation batch (default: run_eval's)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--out", default="runs/bf16_quality")
    p.add_argument("--force", action="store_true", help="run bf16 even where the hardware emulates it")
    args = p.parse_args()
    if default_dtype() != "bfloat16" and not args.force:
        raise SystemExit("this machine has no native bf16 (the dtype policy picks float32): bf16 would be ~100x "
                         "slower; run on a CPU with AVX512-BF16/AMX or a GPU, or pass --force")
    verdicts: dict[str, dict[tuple[str, str, str], tuple[str, bool]]] = {}
    for dtype in ("float32", "bfloat16"):
        verdicts[dtype] = {}
        for task in ("builtin-harmful", "builtin-benign"):
            out = Path(args.out) / dtype / task
            run_eval(EvalConfig(model=args.model, task=task, out=str(out), languages=args.languages,
                                split=args.split, limit=args.limit or None, max_new_tokens=args.max_new_tokens,
                                batch_size=args.batch_size, dtype=dtype))
            for line in (out / "judged.jsonl").read_text(encoding="utf-8").splitlines():
                j = json.loads(line)
                verdicts[dtype][(task, j["lang"], j["prompt_id"])] = (j["label"], j["refused"])
    same: dict[str, list[bool]] = defaultdict(list)
    for key, v in verdicts["float32"].items():
        same[key[1]].append(verdicts["bfloat16"].get(key) == v)
    for lang, xs in same.items():
        print(f"verdict_agreement {lang} {sum(xs) / len(xs):.3f} ({sum(xs)}/{len(xs)})")
    allx = [x for xs in same.values() for x in xs]
    print(f"verdict_agreement all {sum(allx) / len(allx):.3f} ({sum(allx)}/{len(allx)})")
    refused = {k: v[1] for k, v in verdicts["float32"].items()}
    agree = [refused[k] == verdicts["bfloat16"][k][1] for k in refused if k in verdicts["bfloat16"]]
    print(f"refusal_flag_agreement all {sum(agree) / len(agree):.3f} ({sum(agree)}/{len(agree)})")
    for task in ("builtin-harmful", "builtin-benign"):
        for scope, langs in (("en", {"en"}), ("non-en", None)):
            rates = []
            for dtype in ("float32", "bfloat16"):
                xs = [v[1] for k, v in verdicts[dtype].items() if k[0] == task and (k[1] in langs if langs else k[1] != "en")]
                rates.append(f"{dtype} {100 * sum(xs) / max(len(xs), 1):.1f} % of {len(xs)}")
            print(f"# refused, {task}, {scope}: " + ", ".join(rates))


if __name__ == "__main__":
    main()
