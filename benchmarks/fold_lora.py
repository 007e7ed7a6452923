"""Folding LoRA into the base for sampling: PEFT's delta (fp32 B A, scaled, cast, added) against
``polyalign.models.sampling.folded_weight`` (one ``addmm`` in the base's dtype), alternating in one
process on the same adapter.

    python benchmarks/fold_lora.py                                   # 0.5B, the dtype policy's dtype, 3 repeats
    python benchmarks/fold_lora.py --model builtin:tiny-random --repeats 1   # smoke
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import polyalign.models.sampling as sampling
from polyalign.models.adapters import LoraSettings, attach_lora
from polyalign.models.loading import load_model, model_dtype


def peft_delta(weight: torch.Tensor, lora_b: torch.Tensor, lora_a: torch.Tensor, scaling: float) -> torch.Tensor:
    """What ``_folded`` computed before 2026-12-06 (PEFT's ``get_delta_weight`` for a plain Linear)."""
    return weight + (lora_b @ lora_a * scaling).to(weight.dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--dtype", default=None)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    model = attach_lora(load_model(args.model, dtype=args.dtype), LoraSettings(r=16, alpha=32))
    with torch.no_grad():
        for n, prm in model.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.01)                     # a trained adapter, not B = 0
    fast = sampling.folded_weight
    times: dict[str, list[float]] = {"peft": [], "addmm": []}
    try:
        for k in range(args.repeats + 1):              # the first round warms the allocator, untimed
            for name, fold in (("peft", peft_delta), ("addmm", fast)):
                sampling.folded_weight = fold
                t0 = time.perf_counter()
                with sampling.folded_lora(model):
                    pass
                if k:
                    times[name].append(time.perf_counter() - t0)
    finally:
        sampling.folded_weight = fast
    old, new = (statistics.median(times[s]) for s in ("peft", "addmm"))
    print(f"# {args.model}, base {model_dtype(model)}, LoRA r 16 on every linear layer; medians of {args.repeats}")
    print(f"fold every layer: PEFT's delta {old:.3f} s, addmm {new:.3f} s")
    print(f"ratio fold_peft_vs_addmm {old / new:.3f}")


if __name__ == "__main__":
    main()
