"""The demo's evaluation at several batch sizes, side by side (issue #26).

    python benchmarks/eval_batch_size.py                                   # 0.5B, batches 32 and 128, 2 repeats
    python benchmarks/eval_batch_size.py --sizes 32,96,128 --repeats 1
    python benchmarks/eval_batch_size.py --model builtin:tiny-random --sizes 4,16 --limit 2   # smoke

Decoding on a CPU reads every weight once per generated token whatever the number of rows, so a
call over more prompts costs little more per token than one over fewer. Each side runs the demo's
own evaluation (``run_eval`` on builtin-harmful and builtin-benign, the dev split, ``--limit``
prompts per language, nine languages, greedy, 40 new tokens) on one loaded base model into an
empty cache, the sizes alternating. Prints each side's seconds (median over ``--repeats``), the
ratio against the first size, and how many responses and refusal verdicts equal the first size's:
in bf16 the batch's padding moves some greedy tokens. CPU model and flags first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from msd_profile import cpu_info, load  # noqa: E402

LANGS = ["en", "zh", "th", "ar", "sw", "bn", "ko", "vi", "jv"]


def evaluate(model, tok, spec: str, batch: int, limit: int, max_new_tokens: int) -> tuple[float, dict]:
    """(seconds, {(task, prompt_id, lang): judged row}) of the demo's two evaluation tasks."""
    from polyalign.eval.runner import EvalConfig, run_eval

    rows = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        for task in ("builtin-harmful", "builtin-benign"):
            cfg = EvalConfig(model=spec, adapter=None, task=task, out=f"{d}/{task}", languages=LANGS, limit=limit,
                             max_new_tokens=max_new_tokens, batch_size=batch)
            run_eval(cfg, model=model, tokenizer=tok)
            for line in Path(f"{d}/{task}/judged.jsonl").read_text().splitlines():
                r = json.loads(line)
                rows[(task, r["prompt_id"], r["lang"])] = r
    return time.perf_counter() - t0, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--sizes", default="32,128", help="batch sizes, the first is the reference")
    p.add_argument("--limit", type=int, default=16, help="prompts per language and task (the demo's 16)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", default=None, help="the base's dtype (default: the policy's)")
    args = p.parse_args()

    from polyalign.models import load_model, load_tokenizer
    from polyalign.models.loading import model_dtype

    name, flags = cpu_info()
    print(f"# CPU: {name}; flags: {' '.join(flags)}; {load()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    tok = load_tokenizer(args.model)
    model = load_model(args.model, dtype=args.dtype, device="cpu").eval()
    sizes = [int(s) for s in args.sizes.split(",")]
    times: dict[int, list[float]] = {s: [] for s in sizes}
    rows: dict[int, dict] = {}
    for _ in range(args.repeats):
        for size in sizes:
            dt, rows[size] = evaluate(model, tok, args.model, size, args.limit, args.max_new_tokens)
            times[size].append(dt)
    ref = sizes[0]
    keys = sorted(rows[ref])
    print(f"# {args.model}, {model_dtype(model)}, {len(keys)} prompts, {args.max_new_tokens} new tokens, greedy; "
          f"medians of {args.repeats}")
    print(f"| batch | seconds | ratio vs batch {ref} | same response | same refusal verdict |")
    print("|---|---|---|---|---|")
    for size in sizes:
        med = statistics.median(times[size])
        same_text = sum(rows[size][k]["response"] == rows[ref][k]["response"] for k in keys)
        same_refusal = sum(rows[size][k]["refused"] == rows[ref][k]["refused"] for k in keys)
        print(f"| {size} | {med:.1f} ({', '.join(f'{t:.1f}' for t in times[size])}) | "
              f"{statistics.median(times[ref]) / med:.3f} | {same_text}/{len(keys)} | {same_refusal}/{len(keys)} |")
    print(f"# {load()}")


if __name__ == "__main__":
    main()
