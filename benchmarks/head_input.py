"""The LM head's input layout during generation, measured: a frozen model (any adapter model) with
and without ``contiguous_head_input`` (polyalign.models.loading), side by side in one process.

    python benchmarks/head_input.py --model builtin:qwen2.5-coder-0.5b-instruct --batch 32

Without the hook, generation's first step multiplies a strided ``hidden[:, -1:, :]`` by a head
weight that needs no gradient, and torch's CPU matmul expands the [V, H] weight once per row
(BENCHMARKS.md, 2026-12-03 section). Prints seconds per ``generate`` call and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def generate_seconds(model, ids: torch.Tensor, new_tokens: int) -> float:
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False)
        return time.perf_counter() - t0


def main() -> None:
    from polyalign.models import load_model
    from polyalign.models.loading import model_dtype

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=30)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args()
    model = load_model(args.model)                       # the dtype policy's choice; the hook is installed
    for w in model.parameters():
        w.requires_grad_(False)                          # as under LoRA: the base (and head) frozen
    head = model.get_output_embeddings()
    hooks = dict(head._forward_pre_hooks)
    ids = torch.randint(3, min(5000, model.config.vocab_size), (args.batch, args.prompt_len))
    generate_seconds(model, ids, 2)                      # warm-up
    times: dict[str, list[float]] = {"with": [], "without": []}
    for _ in range(args.reps):
        for side in ("with", "without"):
            head._forward_pre_hooks.clear()
            if side == "with":
                head._forward_pre_hooks.update(hooks)
            times[side].append(generate_seconds(model, ids, args.new_tokens))
    head._forward_pre_hooks.update(hooks)
    w, wo = statistics.median(times["with"]), statistics.median(times["without"])
    print(f"# {args.model} in {model_dtype(model)}, frozen weights, batch {args.batch}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens: with the hook {w:.2f} s, without {wo:.2f} s per generate call")
    print(f"ratio frozen_generate_without_vs_with_contiguous_head_input {wo / w:.3f}")


if __name__ == "__main__":
    main()
