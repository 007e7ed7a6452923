"""End-to-end generation throughput of evaluation's path by batch size, and transformers'
continuous batching on the same prompts.

    python benchmarks/generation_batches.py [--model SPEC] [--batches 1,8,16,32] [--tokens 32]

Each batch size runs ``generate_cached`` (length-sorted batches, on-disk cache in a temporary
folder) over the same 32 benign prompts (8 each in en zh th sw; batch 1 on every 4th of them, as
``run.py --quick`` does), greedy. ``--continuous`` adds ``model.generate_batch`` (transformers'
continuous batching with a paged KV cache) on all 32. Prints tokens/s and the ratio to batch 1.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--batches", default="1,8,16,32")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--continuous", action="store_true")
    args = p.parse_args()
    from polyalign.data.builtin import builtin_benchmark
    from polyalign.eval.generation import (
        GenerationCache,
        GenerationSettings,
        GenRequest,
        HFGenerator,
        generate_cached,
    )
    from polyalign.models import load_model, load_tokenizer
    from polyalign.models.chat import render_prompt

    tok, model = load_tokenizer(args.model), load_model(args.model)
    recs = builtin_benchmark("benign", "eval")[:8]
    reqs = [GenRequest(r.id, lang, r.texts[lang]) for lang in ("en", "zh", "th", "sw") for r in recs]
    s = GenerationSettings(max_new_tokens=args.tokens)

    def n_tokens(texts: list[str]) -> int:
        return sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)

    base = None
    for bs in map(int, args.batches.split(",")):
        subset = reqs[::4] if bs == 1 else reqs
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            rows, _, _ = generate_cached(HFGenerator(model, tok, batch_size=bs), subset, s,
                                         GenerationCache(Path(tmp) / "g.jsonl"), fingerprint=str(bs))
            sec = time.perf_counter() - t0
        rate = n_tokens([r["response"] for r in rows.values()]) / sec
        base = base or rate
        print(f"generate batch {bs}: {len(subset)} prompts, {rate:.1f} tok/s, {rate / base:.2f}x the first")
    if args.continuous:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        ids = [tok(render_prompt(tok, r.text), add_special_tokens=False)["input_ids"] for r in reqs]
        cfg = GenerationConfig(max_new_tokens=args.tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
        # its KV cache is sized from free memory (60 % by default on a CPU: 14 GB on a 24 GB machine,
        # which the OOM killer took on 2026-12-06 with a study running beside it); a tenth does here
        cb = ContinuousBatchingConfig(max_memory_percent=0.1)
        model.generate_batch(inputs=ids[:2], generation_config=cfg, continuous_batching_config=cb)   # warm-up
        t0 = time.perf_counter()
        out = model.generate_batch(inputs=ids, generation_config=cfg, continuous_batching_config=cb)
        sec = time.perf_counter() - t0
        rate = n_tokens([tok.decode(o.generated_tokens, skip_special_tokens=True).strip() for o in out.values()]) / sec
        print(f"generate_batch (continuous): {len(ids)} prompts, {rate:.1f} tok/s, {rate / base:.2f}x the first")


if __name__ == "__main__":
    main()
