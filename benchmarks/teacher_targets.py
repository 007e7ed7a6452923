"""The teacher's greedy answers that ``msd.mode: sft`` trains on (and teacher gating probes), decoded
the old way and the evaluation's way, side by side (issue #26).

    python benchmarks/teacher_targets.py                     # 0.5B, 32 of the demo's training prompts
    python benchmarks/teacher_targets.py --prompts 64 --sizes 8,32
    python benchmarks/teacher_targets.py --model builtin:tiny-random --prompts 8 --sizes 4   # smoke

``label_sft`` (``msd.mode: sft``) first asks the frozen, label-conditioned teacher for a greedy answer
to every training prompt (``MSDTrainer.teacher_targets``): on the fp32 AMD EPYC Zen 1 of 2026-12-07,
2059 s for the 384 sequences of the comparisons' 0.5B point, 60 % of its training time. Those
answers came from ``generate`` in batches of 8, every row decoded until the batch's last one ended
and the chat template's system turn prefilled in every row. Evaluation decodes greedily with the
head prefilled once and ended rows leaving the batch (``polyalign.models.greedy.greedy_ids``); the
trainer's greedy answers now do too.

Sides, on one loaded model and the same prompts (every ``len / prompts``-th of the recipe's teacher
prompts sorted by length, so that short and long ones are in; batched in that order as
``teacher_targets`` batches them): ``generate`` in batches of the first size, then ``greedy_ids`` in
batches of each size. Prints seconds, the ratio against ``generate`` and how many answers equal
``generate``'s token for token (in fp32 a smaller batch rounds differently; float64 tests hold them
equal: ``tests/test_greedy_decode.py``). CPU model and flags first.

``--full CACHE``: instead, the recipe's trainer with ``msd.mode=sft`` builds every target as a
``label_sft`` run does (``MSDTrainer.teacher_targets``, timed alone), and its targets are compared,
key by key, with ``CACHE``, the ``sft_targets.json`` of an earlier run (same model, recipe, length
and ``--seed``, which samples the training prompts), e.g.::

    python benchmarks/teacher_targets.py --full runs/comparisons_0.5b/points/label_sft/seed2/train/sft_targets.json --seed 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from msd_profile import build_trainer, cpu_info, load  # noqa: E402


def answers(trainer, prompts: list[list[int]], size: int, new_tokens: int, compact: bool) -> tuple[float, list]:
    """(seconds, greedy answers) of ``prompts`` in consecutive batches of ``size``, as
    ``MSDTrainer.teacher_targets`` asks for them."""
    os.environ["POLYALIGN_COMPACT_DECODE"] = "1" if compact else "0"
    out: list[list[int]] = []
    t0 = time.perf_counter()
    for start in range(0, len(prompts), size):
        out += trainer.sample_responses(trainer.model, prompts[start:start + size], from_teacher=True, greedy=True,
                                        max_new_tokens=new_tokens)
    return time.perf_counter() - t0, out


def full(args: argparse.Namespace) -> None:
    """Every target of the recipe in ``msd.mode=sft``, timed, against an earlier run's cache."""
    import json

    from polyalign.models.loading import model_dtype
    from polyalign.train.msd_trainer import SFT_TARGETS_FILE, MSDTrainer

    if args.greedy_batch:
        MSDTrainer.greedy_batch_size = args.greedy_batch
    took: dict[str, float] = {}
    make = MSDTrainer.teacher_targets

    def timed(self, examples):
        t0 = time.perf_counter()
        out = make(self, examples)
        took["s"] = time.perf_counter() - t0
        return out

    MSDTrainer.teacher_targets = timed
    ns = argparse.Namespace(model=args.model, recipe=args.recipe, check=0, batch=None,
                            max_new_tokens=args.max_new_tokens, overrides=["msd.mode=sft", f"seed={args.seed}"])
    with tempfile.TemporaryDirectory() as out:
        trainer, _ = build_trainer(ns, out)
        new = json.loads((Path(out) / SFT_TARGETS_FILE).read_text())
    old = json.loads(Path(args.full).read_text())
    common = sorted(set(new) & set(old))
    same = sum(new[k] == old[k] for k in common)
    print(f"# model {args.model}, {model_dtype(trainer.model)}, recipe {args.recipe}, msd.mode=sft, greedy batch "
          f"{MSDTrainer.greedy_batch_size}")
    print(f"teacher_targets: {len(new)} targets in {took['s']:.1f} s ({sum(map(len, new.values()))} tokens); "
          f"{len(common)} keys also in {args.full}, {same} of them the same token for token")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--recipe", default="msd_selective")
    p.add_argument("--prompts", type=int, default=32, help="how many of the recipe's teacher prompts")
    p.add_argument("--sizes", default="8,32", help="batch sizes: generate runs the first, greedy_ids each")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the recipe's msd.max_new_tokens")
    p.add_argument("--full", metavar="CACHE", default=None,
                   help="instead: every target of the recipe in msd.mode=sft, timed, compared with CACHE "
                        "(an earlier run's sft_targets.json)")
    p.add_argument("--seed", type=int, default=0, help="--full: the recipe's seed (it samples the training prompts)")
    p.add_argument("--greedy-batch", type=int, default=None, help="--full: MSDTrainer.greedy_batch_size")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    model_name, flags = cpu_info()
    print(f"# cpu: {model_name}, {os.cpu_count()} logical cores; flags: {' '.join(flags)}")
    print(f"# {load()} at start", flush=True)
    if args.full:
        full(args)
        print(f"# {load()} at end")
        return
    ns = argparse.Namespace(model=args.model, recipe=args.recipe, check=0, batch=None,
                            max_new_tokens=args.max_new_tokens)
    with tempfile.TemporaryDirectory() as out:
        trainer, r = build_trainer(ns, out)
        from polyalign.models.loading import model_dtype

        examples = list(trainer.train_dataset)
        _, teacher = trainer._prompts(examples)
        ordered = sorted(teacher, key=len)
        step = max(1, len(ordered) // args.prompts)
        prompts = ordered[::step][:args.prompts]
        n = r.msd["max_new_tokens"] if args.max_new_tokens is None else args.max_new_tokens
        print(f"# model {args.model}, {model_dtype(trainer.model)}, recipe {args.recipe}: {len(prompts)} of "
              f"{len(teacher)} teacher prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens), "
              f"{n} new tokens", flush=True)
        answers(trainer, prompts[:2], 2, 2, True)                        # warm-up
        base_s, base = answers(trainer, prompts, sizes[0], n, compact=False)
        print("| side | batch | seconds | vs generate | answers equal to generate's | tokens |")
        print("|---|---|---|---|---|---|")
        print(f"| generate, every row to the batch's end | {sizes[0]} | {base_s:.1f} | 1.000 | "
              f"{len(base)}/{len(base)} | {sum(map(len, base))} |", flush=True)
        for size in sizes:
            s, got = answers(trainer, prompts, size, n, compact=True)
            same = sum(a == b for a, b in zip(got, base))
            print(f"| greedy_ids: head once, ended rows leave | {size} | {s:.1f} | {base_s / s:.3f} | "
                  f"{same}/{len(base)} | {sum(map(len, got))} |", flush=True)
            if size == sizes[-1]:
                print(f"ratio teacher_targets_compact_vs_generate {base_s / s:.3f} (batch {size} vs {sizes[0]})")
    print(f"# {load()} at end")


if __name__ == "__main__":
    main()
