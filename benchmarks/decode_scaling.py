"""Cost of one decode step (a 1-token forward with ``logits_to_keep=1``) against batch size.

    python benchmarks/decode_scaling.py [--model SPEC]

Prints, per batch size, the step time and the tokens/s ceiling it allows: the upper bound of
``batched_vs_sequential_generation`` on this machine (real generation also pays for rows that
finished early and for the prompt prefill).
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--batches", default="1,8,16,32")
    args = p.parse_args()
    from polyalign.models import load_model

    model = load_model(args.model)
    base = None
    with torch.no_grad():
        for b in map(int, args.batches.split(",")):
            ids = torch.randint(0, model.config.vocab_size, (b, 1))
            model(input_ids=ids, logits_to_keep=1)                       # warm-up
            t0 = time.perf_counter()
            for _ in range(5):
                model(input_ids=ids, logits_to_keep=1)
            ms = (time.perf_counter() - t0) / 5 * 1000
            rate = b * 1000 / ms
            base = base or rate
            print(f"batch {b}: {ms:.0f} ms per step, {rate:.1f} tok/s ceiling, {rate / base:.2f}x batch 1")


if __name__ == "__main__":
    main()
