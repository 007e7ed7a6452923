"""Where the MSD step's sampling time goes, decode step by decode step (issue #26).

    python benchmarks/sampling_split.py                     # 0.5B, recipes/msd_selective.yaml, the policy's dtype
    python benchmarks/sampling_split.py --dtype float32
    python benchmarks/sampling_split.py --model builtin:tiny-random --batch 2 --max-new-tokens 4   # smoke

``msd_profile.py`` puts the sampling stage at about twice its weight-read floor. This splits it: one
warm-up step, then ``--steps`` MSD steps of the demo's recipe (as ``msd_profile.py`` builds them),
with wall-clock timers around the model's parts only while ``generate`` runs:

- per decode step (a logits processor stamps each one): the first (it packs the folded weights for
  oneDNN) and the median of the rest;
- per part, inclusive, per decode step: the decoder layers, their attention and MLP blocks, the
  norms, rotary application, the KV cache's update, the attention kernel, every linear stand-in by
  shape (with the read floor of its weight at the measured bandwidth), the LM head, the draw;
- the cost of a cold cache: a small module (the model's first norm) timed alone and right after a
  read of as many bytes as the MLP's largest weight. Each decode step streams every weight through
  the caches, so each small operator that follows a large product starts cold.

Timers add a few microseconds per call: the timed step's seconds are printed, to hold against an
untimed ``msd_profile.py`` run of the same commit.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

PART_SUFFIXES = ("DecoderLayer", "Attention", "MLP", "RMSNorm")


class Timers:
    """Inclusive wall seconds and calls per part, counted only while ``on``."""

    def __init__(self) -> None:
        self.on = False
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter = collections.Counter()
        self.stamps: list[float] = []

    def wrap(self, fn: Any, key: Any) -> Any:
        """``fn`` timed under ``key`` (a string, or a function of the call's arguments)."""
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                k = key(*args, **kwargs) if callable(key) else key
                self.seconds[k] += time.perf_counter() - t0
                self.calls[k] += 1
        return timed


@contextlib.contextmanager
def patched(owner: Any, name: str, new: Any):
    old = getattr(owner, name)
    setattr(owner, name, new)
    try:
        yield
    finally:
        setattr(owner, name, old)


def linear_key(head_shape: tuple[int, ...]) -> Any:
    def key(module: Any, x: torch.Tensor) -> str:
        shape = tuple(module.folded_weight.shape)
        return "LM head" if shape == head_shape else f"linear {shape[0]}x{shape[1]}"
    return key


def instrument(stack: contextlib.ExitStack, model: Any, timers: Timers) -> None:
    """Timers on the model's parts (by class), the linear stand-ins, the draw and ``generate``."""
    import transformers.cache_utils as cache_utils
    import transformers.generation.utils as gen_utils

    from polyalign.models import sampling

    classes = {type(m) for m in model.modules() if type(m).__name__.endswith(PART_SUFFIXES)}
    for cls in classes:
        part = next(s for s in PART_SUFFIXES if cls.__name__.endswith(s))
        stack.enter_context(patched(cls, "forward", timers.wrap(cls.forward, {
            "DecoderLayer": "decoder layers", "Attention": "attention block", "MLP": "MLP block",
            "RMSNorm": "norms"}[part])))
    for mod in {sys.modules[cls.__module__] for cls in classes}:
        if hasattr(mod, "apply_rotary_pos_emb"):
            stack.enter_context(patched(mod, "apply_rotary_pos_emb", timers.wrap(mod.apply_rotary_pos_emb,
                                                                                  "rotary application")))
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = model.config._attn_implementation if hasattr(model, "config") else "sdpa"
    if impl in ALL_ATTENTION_FUNCTIONS:        # the modeling files look the kernel up at each call
        timed = timers.wrap(ALL_ATTENTION_FUNCTIONS[impl], "attention kernel")
        stack.enter_context(patched(ALL_ATTENTION_FUNCTIONS, "_local_mapping",
                                    {**ALL_ATTENTION_FUNCTIONS._local_mapping, impl: timed}))
    stack.enter_context(patched(cache_utils.DynamicCache, "update",
                                timers.wrap(cache_utils.DynamicCache.update, "KV cache update")))
    folded = sampling._folded_linear_class()
    head_shape = tuple(model.get_output_embeddings().weight.shape)
    stack.enter_context(patched(folded, "forward", timers.wrap(folded.forward, linear_key(head_shape))))
    stack.enter_context(patched(sampling.InverseCDFDraw, "__call__",
                                timers.wrap(sampling.InverseCDFDraw.__call__, "draw")))
    generate = gen_utils.GenerationMixin.generate

    def timed_generate(self: Any, *args: Any, **kwargs: Any) -> Any:
        from transformers import LogitsProcessorList

        class Stamp:
            def __call__(self, input_ids: Any, scores: Any) -> Any:
                timers.stamps.append(time.perf_counter())
                return scores

        procs = kwargs.get("logits_processor") or LogitsProcessorList()
        kwargs["logits_processor"] = LogitsProcessorList([Stamp(), *procs])
        timers.on = True
        timers.stamps.append(time.perf_counter())
        try:
            return generate(self, *args, **kwargs)
        finally:
            timers.on = False
    stack.enter_context(patched(gen_utils.GenerationMixin, "generate", timed_generate))


def cold_cache(model: Any, nbytes: int, trials: int = 300) -> tuple[float, float]:
    """(seconds of the model's first norm on one decode row alone, the same right after reading
    ``nbytes``): the price a small operator pays when a weight's read has evicted the caches."""
    norm = next(m for m in model.modules() if type(m).__name__.endswith("RMSNorm"))
    w = next(p for p in norm.parameters())
    x = torch.randn(8, 1, w.shape[0], dtype=w.dtype)
    big = torch.ones(max(nbytes // 4, 1), dtype=torch.float32)

    def per_call(f: Any) -> float:
        for _ in range(20):
            f()
        t0 = time.perf_counter()
        for _ in range(trials):
            f()
        return (time.perf_counter() - t0) / trials

    with torch.no_grad():
        alone = per_call(lambda: norm(x))
        read = per_call(big.sum)
        after = per_call(lambda: (big.sum(), norm(x))) - read
    return alone, after


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--recipe", default="msd_selective")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="the base's (default: the policy's)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    args.check, args.no_share_prefill = 0, False
    import msd_profile as mp

    from polyalign.models.loading import model_dtype

    name, flags = mp.cpu_info()
    print(f"# cpu: {name}, torch threads {torch.get_num_threads()}; flags: {' '.join(flags)}")
    print(f"# {mp.load()} at start; torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as out:
        trainer, r = mp.stepping_trainer(args, out, args.steps + 2, dtype=args.dtype)
        model = trainer.accelerator.unwrap_model(trainer.model)
        dtype = model_dtype(model)
        bandwidth = mp.read_bandwidth()
        batch, start = next(iter(trainer.get_train_dataloader())), mp.adapter_state(trainer.model)
        draw = trainer.msd.draw
        mp.step_from(trainer, batch, start, False, args.seed, draw)               # warm-up
        timers = Timers()
        steps, sampling, gaps = [], [], []
        with contextlib.ExitStack() as stack:
            instrument(stack, model, timers)
            for k in range(args.steps):
                timers.stamps.clear()
                clock, sec, _ = mp.step_from(trainer, batch, start, False, args.seed + k, draw)
                steps.append(sec)
                sampling.append(clock.seconds["sampling"])
                gaps.append([b - a for a, b in zip(timers.stamps, timers.stamps[1:], strict=False)])
        decode_steps = sum(len(g) for g in gaps)
        rest = [x for g in gaps for x in g[1:]]
        print(f"# model {args.model}, {dtype}, recipe {args.recipe}: batch {r.training['per_device_train_batch_size']}, "
              f"{r.msd['max_new_tokens']} sampled tokens; memory read {bandwidth / 1e9:.1f} GB/s")
        print(f"# {args.steps} timed MSD steps: {statistics.median(steps):.2f} s a step (median), sampling "
              f"{statistics.median(sampling):.2f} s, {decode_steps} decode steps; first decode step "
              f"{statistics.median(g[0] for g in gaps) * 1e3:.1f} ms (packs the folded weights), the others "
              f"{statistics.median(rest) * 1e3:.1f} ms (median)")
        sizes = {}
        for m in model.modules():
            w = getattr(m, "weight", None)
            if isinstance(m, torch.nn.Linear) and w is not None:
                sizes.setdefault(f"linear {w.shape[0]}x{w.shape[1]}", w.numel() * w.element_size())
        head = model.get_output_embeddings().weight
        sizes.pop(f"linear {head.shape[0]}x{head.shape[1]}", None)
        sizes["LM head"] = head.numel() * head.element_size()
        print()
        print("| part (inclusive) | ms per decode step | share of a decode step | calls per decode step | "
              "us per call | weight read floor, us per call |")
        print("|---|---|---|---|---|---|")
        per_step = statistics.median(rest)
        order = sorted(timers.seconds.items(), key=lambda kv: -kv[1])
        for k, sec in order:
            ms = sec / decode_steps * 1e3
            calls = timers.calls[k] / decode_steps
            floor = f"{sizes[k] / bandwidth * 1e6:.0f}" if k in sizes else "-"
            print(f"| {k} | {ms:.2f} | {ms / (per_step * 1e3):.0%} | {calls:.0f} | "
                  f"{sec / timers.calls[k] * 1e6:.0f} | {floor} |")
        linears = sum(v for k, v in timers.seconds.items() if k.startswith("linear ") or k == "LM head")
        floor_all = sum(sizes.get(k, 0) * timers.calls[k] for k in timers.seconds) / bandwidth
        print()
        print(f"linear products: {linears / decode_steps * 1e3:.1f} ms per decode step against a read floor of "
              f"{floor_all / decode_steps * 1e3:.1f} ms; everything else in a decode step: "
              f"{(per_step - linears / decode_steps) * 1e3:.1f} ms")
        biggest = max(v for k, v in sizes.items() if k != "LM head")
        alone, after = cold_cache(model, biggest)
        print(f"cold cache: the first norm on 8 decode rows takes {alone * 1e6:.1f} us alone and "
              f"{after * 1e6:.1f} us right after a {biggest / 1e6:.1f} MB read (ratio {after / alone:.2f})")
        print(f"# {mp.load()} at end")


if __name__ == "__main__":
    main()
