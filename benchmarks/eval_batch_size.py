"""The demo's evaluation at several batch sizes, side by side (issue #26).

    python benchmarks/eval_batch_size.py                                   # 0.5B, batches 32 and 128, 2 repeats
    python benchmarks/eval_batch_size.py --sizes 32,96,128 --repeats 1
    python benchmarks/eval_batch_size.py --model builtin:tiny-random --sizes 4,16 --limit 2   # smoke
    python benchmarks/eval_batch_size.py --profile 128              # where a decode step's time goes at 128 rows
    python benchmarks/eval_batch_size.py --sizes 128 --share-head   # the system turn in every row vs prefilled once
    python benchmarks/eval_batch_size.py --sizes 128 --compact --adapter runs/demo/msd/checkpoint-32
        # every row to the last one's end (generate) vs ended rows leaving the batch, the trained adapter
    python benchmarks/eval_batch_size.py --sizes 32 --compact --tasks mgsm --langs en,zh,th,sw,bn --limit 8 \
        --max-new-tokens 384                                       # the same on MGSM's long answers

Decoding on a CPU reads every weight once per generated token whatever the number of rows, so a
call over more prompts costs little more per token than one over fewer. Each side runs the demo's
own evaluation (``run_eval`` on builtin-harmful and builtin-benign, the dev split, ``--limit``
prompts per language, nine languages, greedy, 40 new tokens) on one loaded base model into an
empty cache, the sizes alternating. Prints each side's seconds (median over ``--repeats``), the
ratio against the first size, and how many responses and refusal verdicts equal the first size's:
in bf16 the batch's padding moves some greedy tokens. CPU model and flags first.

``--profile N``: instead, one call of N of those prompts (the shortest N by tokens, as the first
batch of an evaluation) under ``torch.profiler``, generating 1 and then ``--max-new-tokens`` tokens;
the difference over the extra tokens is a decode step: its wall ms and its top operators' self ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from msd_profile import cpu_info, load  # noqa: E402

LANGS = ["en", "zh", "th", "ar", "sw", "bn", "ko", "vi", "jv"]


MGSM = str(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mgsm")


def evaluate(model, tok, spec: str, batch: int, limit: int, max_new_tokens: int, adapter: str | None = None,
             tasks: tuple[str, ...] = ("builtin-harmful", "builtin-benign"), langs: list[str] = LANGS,
             ) -> tuple[float, dict]:
    """(seconds, {(task, prompt_id, lang): judged row}) of the demo's two evaluation tasks (or ``tasks``)."""
    from polyalign.eval.runner import EvalConfig, run_eval

    rows = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        for task in tasks:
            cfg = EvalConfig(model=spec, adapter=adapter, task=task, out=f"{d}/{task}", languages=langs, limit=limit,
                             max_new_tokens=max_new_tokens, batch_size=batch,
                             data=MGSM if task == "mgsm" else None)
            run_eval(cfg, model=model, tokenizer=tok)
            for line in Path(f"{d}/{task}/judged.jsonl").read_text().splitlines():
                r = json.loads(line)
                rows[(task, r["prompt_id"], r["lang"])] = r
    return time.perf_counter() - t0, rows


def profile_decode(model, tok, spec: str, rows: int, limit: int, new_tokens: int, top: int = 8) -> None:
    """ms per decode step of one evaluation call of ``rows`` prompts, by operator (profiler on)."""
    from torch.profiler import ProfilerActivity, profile

    from polyalign.eval.generation import GenerationSettings, HFGenerator
    from polyalign.eval.runner import select_requests
    from polyalign.eval.tasks import get_task
    from polyalign.models.sampling import decoding_linears

    texts = [r.text for name in ("builtin-harmful", "builtin-benign")
             for r in select_requests(get_task(name).load(), LANGS, limit)]
    gen = HFGenerator(model, tok, rows)
    texts = sorted(texts, key=lambda t: gen.prompt_length(t, GenerationSettings()))[:rows]
    per: dict[int, tuple[float, dict[str, float]]] = {}
    with decoding_linears(model):
        for n in (1, new_tokens):
            settings = GenerationSettings(max_new_tokens=n)
            gen.generate(texts, settings)                                        # warm (packing)
            t0 = time.perf_counter()
            gen.generate(texts, settings)
            wall = time.perf_counter() - t0
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                gen.generate(texts, settings)
            per[n] = (wall, {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()})
    steps = new_tokens - 1
    ops = {k: (v - per[1][1].get(k, 0.0)) / steps for k, v in per[new_tokens][1].items()}
    print(f"# decode step at {len(texts)} rows ({spec}): {1e3 * (per[new_tokens][0] - per[1][0]) / steps:.1f} ms "
          f"wall, {sum(ops.values()):.1f} ms of operators under the profiler; prefill {per[1][0]:.2f} s")
    for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:top]:
        print(f"#   {v:7.2f} ms  {k}")


def verdict(row: dict) -> object:
    """A judged row's verdict: refusal (safety tasks) or correctness (MGSM, MMLU)."""
    return row["correct"] if "correct" in row else row["refused"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--sizes", default="32,128", help="batch sizes, the first is the reference")
    p.add_argument("--limit", type=int, default=16, help="prompts per language and task (the demo's 16)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", default=None, help="the base's dtype (default: the policy's)")
    p.add_argument("--share-head", action="store_true",
                   help="the first size with the prompts' common head (system turn) in every row vs prefilled once")
    p.add_argument("--compact", action="store_true",
                   help="the first size with every row decoded to the last one's end (generate) vs ended rows "
                        "leaving the batch (polyalign.models.greedy)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder to evaluate (default: the base model)")
    p.add_argument("--tasks", default="builtin-harmful,builtin-benign", help="tasks (mgsm reads ../shared/data/mgsm)")
    p.add_argument("--langs", default=",".join(LANGS))
    p.add_argument("--profile", type=int, default=0, help="N: profile a decode step of one N-prompt call instead")
    args = p.parse_args()

    from polyalign.models import load_model, load_tokenizer
    from polyalign.models.loading import model_dtype

    name, flags = cpu_info()
    print(f"# CPU: {name}; flags: {' '.join(flags)}; {load()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    tok = load_tokenizer(args.model)
    model = load_model(args.model, dtype=args.dtype, device="cpu").eval()
    if args.profile:
        profile_decode(model, tok, args.model, args.profile, args.limit, args.max_new_tokens)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    # a side: (batch size, the prompts' common head prefilled once (batching.shared_head_length),
    # ended rows leaving the batch (greedy.greedy_decode))
    if args.share_head:
        sides = [(sizes[0], False, True), (sizes[0], True, True)]
    elif args.compact:
        sides = [(sizes[0], True, False), (sizes[0], True, True)]
    else:
        sides = [(s, True, True) for s in sizes]
    tasks, langs = tuple(args.tasks.split(",")), args.langs.split(",")
    times: dict[tuple[int, bool, bool], list[float]] = {s: [] for s in sides}
    rows: dict[tuple[int, bool, bool], dict] = {}
    for _ in range(args.repeats):
        for side in sides:
            os.environ["POLYALIGN_SHARE_HEAD"] = "1" if side[1] else "0"
            os.environ["POLYALIGN_COMPACT_DECODE"] = "1" if side[2] else "0"
            dt, rows[side] = evaluate(model, tok, args.model, side[0], args.limit, args.max_new_tokens, args.adapter,
                                      tasks, langs)
            times[side].append(dt)
    os.environ.pop("POLYALIGN_SHARE_HEAD")
    os.environ.pop("POLYALIGN_COMPACT_DECODE")
    ref = sides[0]
    keys = sorted(rows[ref])
    print(f"# {args.model}{' + ' + args.adapter if args.adapter else ''}, {model_dtype(model)}, {len(keys)} prompts "
          f"({', '.join(tasks)}), {args.max_new_tokens} new tokens, greedy; medians of {args.repeats}")
    print("| batch | common head | ended rows | seconds | ratio vs the first row | same response | same verdict |")
    print("|---|---|---|---|---|---|---|")
    for side in sides:
        med = statistics.median(times[side])
        same_text = sum(rows[side][k]["response"] == rows[ref][k]["response"] for k in keys)
        same_verdict = sum(verdict(rows[side][k]) == verdict(rows[ref][k]) for k in keys)
        print(f"| {side[0]} | {'prefilled once' if side[1] else 'in every row'} | "
              f"{'leave the batch' if side[2] else 'decoded to the end'} | {med:.1f} "
              f"({', '.join(f'{t:.1f}' for t in times[side])}) | {statistics.median(times[ref]) / med:.3f} | "
              f"{same_text}/{len(keys)} | {same_verdict}/{len(keys)} |")
    if args.share_head or args.compact:      # two sides of one size: the switch off, then on
        ratio = statistics.median(times[ref]) / statistics.median(times[sides[1]])
        name = "eval_shared_head_vs_not" if args.share_head else "eval_compact_decode_vs_generate"
        print(f"ratio {name} {ratio:.3f}")
    print(f"# {load()}")


if __name__ == "__main__":
    main()
