"""LoRA folded into the base weights, and the sampling draw's search: before commit 0bf5063 and now, side by side (issue #26).

    python benchmarks/fold_merge.py                                        # 0.5B in the policy's dtype, 3 repeats
    python benchmarks/fold_merge.py --model builtin:tiny-random --repeats 1   # smoke

Three pieces of work the MSD step or an adapter's evaluation repeats, each timed both ways in one
process, the two ways alternating, with the results checked bit for bit:

* ``sampling fold`` (every MSD step, before sampling): each LoRA layer's folded weight, base +
  delta rounded to the base dtype. Before: PEFT's ``get_delta_weight``, ``(B A) * scaling``, a pass
  over the full [out, in] product for the scaling; now ``sampling.lora_delta``, ``(B * scaling) A``
  (exact for a power-of-two scaling).
* ``draw search`` (every sampled token): the inverse-CDF draw's search for 8 rows over the
  vocabulary, 48 tokens; before over a copy of the first V - 1 cumulative sums, now over all V,
  clamped.
* ``evaluation merge`` (every adapter evaluation, per task): entering and leaving
  ``merged_for_generation``; before in place (every adapted weight saved, merged, unmerged and
  written back: ``in_place=True``), now into new tensors.

The adapter: r 16, alpha 32, every linear layer (the recipes'), B drawn as a trained one would
look (N(0, 0.02)), A as PEFT initialises it. Prints each side's seconds (median over ``--repeats``),
the ratios ``lora_fold_speedup``, ``draw_search_speedup`` and ``eval_merge_speedup`` (before / now,
> 1: now is faster), whether the results are equal, and the CPU model and flags.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from msd_profile import cpu_info, load  # noqa: E402


def timed(fn) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def fold_before(wrappers: list[Any]) -> list[Any]:
    return [m.base_layer.weight.detach() + m.get_delta_weight("default").detach().to(m.base_layer.weight.dtype)
            for m in wrappers]


def fold_now(wrappers: list[Any]) -> list[Any]:
    from polyalign.models.sampling import lora_delta

    return [m.base_layer.weight.detach() + lora_delta(m, "default").to(m.base_layer.weight.dtype) for m in wrappers]


def draw_searches(cdf: Any, uniforms: list[Any], copy: bool) -> list[Any]:
    import torch

    if copy:
        return [torch.searchsorted(cdf[:, :-1].contiguous(), u, right=True) for u in uniforms]
    return [torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1) for u in uniforms]


def merge_round_trip(model: Any, names: list[str], in_place: bool) -> list[Any]:
    """Enter and leave ``merged_for_generation``; the weights that stood in the wrappers' places."""
    from polyalign.eval.runner import merged_for_generation

    with merged_for_generation(model, in_place=in_place):
        return [model.get_submodule(n).weight.detach().clone() for n in names]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--dtype", default=None, help="the base's dtype (default: the policy's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=48, help="draws per repeat (the demo's 48 sampled tokens)")
    args = p.parse_args()

    import torch
    from peft.tuners.lora.layer import Linear as LoraLinear

    from polyalign.models import LoraSettings, attach_lora, load_model
    from polyalign.models.loading import model_dtype

    name, flags = cpu_info()
    print(f"# CPU: {name}; flags: {' '.join(flags)}; {load()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    torch.manual_seed(0)
    model = attach_lora(load_model(args.model, dtype=args.dtype, device="cpu"), LoraSettings()).eval()
    with torch.no_grad():
        for n, prm in model.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.02)
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    names, wrappers = [n for n, _ in named], [m for _, m in named]
    vocab = model.get_output_embeddings().weight.shape[0]
    cdf = torch.softmax(torch.randn(8, vocab) * 3, dim=-1).double().cumsum(dim=-1)
    uniforms = [torch.rand(8, 1, dtype=torch.float64) * cdf[:, -1:] for _ in range(args.tokens)]

    sides = {
        "sampling fold": (lambda: fold_before(wrappers), lambda: fold_now(wrappers)),
        "draw search": (lambda: draw_searches(cdf, uniforms, True), lambda: draw_searches(cdf, uniforms, False)),
        "evaluation merge": (lambda: merge_round_trip(model, names, True), lambda: merge_round_trip(model, names, False)),
    }
    ratio_names = {"sampling fold": "lora_fold_speedup", "draw search": "draw_search_speedup",
                   "evaluation merge": "eval_merge_speedup"}
    print(f"# {args.model}, {model_dtype(model)}, {len(wrappers)} LoRA layers (r 16, alpha 32), vocabulary {vocab}; "
          f"medians of {args.repeats}")
    print("| work | before (s) | now (s) | ratio | same result |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for work, (before, now) in sides.items():
            times: dict[str, list[float]] = {"before": [], "now": []}
            same = True
            for _ in range(args.repeats):
                tb, rb = timed(before)
                tn, rn = timed(now)
                times["before"].append(tb)
                times["now"].append(tn)
                same = same and all(torch.equal(a, b) for a, b in zip(rb, rn, strict=True))
                del rb, rn
            b, n = statistics.median(times["before"]), statistics.median(times["now"])
            print(f"| {work} | {b:.3f} | {n:.3f} | {ratio_names[work]} **{b / n:.3f}** | {'yes' if same else 'NO'} |")
    print(f"# {load()}")


if __name__ == "__main__":
    main()
