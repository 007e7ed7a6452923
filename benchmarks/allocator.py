"""glibc's malloc as it comes against keeping freed blocks (issue #26), side by side.

    python benchmarks/allocator.py                         # 0.5B: the demo's baseline evaluation + 2 MSD steps a side
    python benchmarks/allocator.py --rounds 2              # the two sides twice, alternating order
    python benchmarks/allocator.py --model builtin:tiny-random --eval-limit 2 --steps 1   # smoke

``polyalign.models.loading.keep_freed_cpu_memory`` (called by ``load_model`` on the CPU) sets glibc's
mmap and trim thresholds to 1 GiB, so large tensors freed by one step are reused by the next instead
of being unmapped and page-faulted anew. Each side runs in its own process (malloc's settings are
per process; ``POLYALIGN_CPU_MALLOC=default`` is the side as it comes), on the same work:

* ``evaluation``: the demo's baseline evaluation (``polyalign.demo._evaluate``: 16 harmful + 16 benign
  dev prompts per language, nine languages, greedy, 40 tokens, batches of 32; ``--eval-limit``);
* ``msd step``: the demo's MSD step (``benchmarks/msd_profile.py``'s trainer: recipes/msd_selective.yaml,
  its first batch), one untimed step, then ``--steps`` steps from the same adapter with seeds 1, 2, ...

and first, in each process after the model is loaded, the product the problem was found in: two bf16
[32, 137, 4864] tensors (42 MiB, an evaluation batch's MLP in its prefill) multiplied into a new
tensor and into one allocated before (``out=``), 20 times each.

Prints each side's seconds, whether the two sides generated the same text and computed the same
losses (the allocator must not change what is computed), each process's peak resident memory, the
ratios ``cpu_malloc_eval_speedup`` and ``cpu_malloc_msd_step_speedup`` (as it comes / kept, > 1:
keeping is faster), and the CPU model and flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from msd_profile import adapter_state, build_trainer, cpu_info, load, step_from  # noqa: E402
from run import peak_since_reset_mb  # noqa: E402

SIDES = {"as it comes": "default", "kept": "keep"}


def product_ms(reps: int = 20) -> dict[str, float]:
    a, b = (torch.randn(32, 137, 4864).to(torch.bfloat16) for _ in range(2))
    out = torch.empty_like(a)
    ms = {}
    for name, f in (("new tensor", lambda: a * b), ("out=", lambda: torch.mul(a, b, out=out))):
        f()
        t0 = time.perf_counter()
        for _ in range(reps):
            f()
        ms[name] = round((time.perf_counter() - t0) / reps * 1e3, 2)
    return ms


def worker(args: argparse.Namespace) -> dict:
    from polyalign.demo import FULL, _evaluate
    from polyalign.models import load_model, load_tokenizer
    from polyalign.models.loading import keep_freed_cpu_memory

    plan = dataclasses.replace(FULL, eval_limit=args.eval_limit)
    res: dict = {}
    with tempfile.TemporaryDirectory() as out:
        tok = load_tokenizer(args.model)
        base = load_model(args.model, device="cpu")
        res["kept"] = keep_freed_cpu_memory()
        res["product_ms"] = product_ms()
        t0 = time.perf_counter()
        _evaluate("baseline", args.model, Path(out), plan, base, tok, None)
        res["eval_s"] = time.perf_counter() - t0
        text = "".join(sorted((Path(out) / "baseline" / task / "generations.jsonl").read_text()
                              for task in ("builtin-harmful", "builtin-benign")))
        res["eval_sha"] = hashlib.sha256(text.encode()).hexdigest()[:16]
        del base
    with tempfile.TemporaryDirectory() as out:
        ns = argparse.Namespace(model=args.model, recipe="msd_selective", batch=None, max_new_tokens=None,
                                check=0, no_share_prefill=False)
        trainer, _ = build_trainer(ns, out)
        trainer.create_optimizer_and_scheduler(num_training_steps=args.steps + 2)
        trainer.current_gradient_accumulation_steps = 1
        trainer.model.train()
        batch = next(iter(trainer.get_train_dataloader()))
        start = adapter_state(trainer.model)
        step_from(trainer, batch, start, False, 1, trainer.msd.draw)            # untimed warm-up
        steps = [step_from(trainer, batch, start, False, 1 + k, trainer.msd.draw) for k in range(args.steps)]
        res["step_s"] = [round(t, 3) for _, t, _ in steps]
        res["stages"] = {s: round(statistics.median(c.seconds.get(s, 0.0) for c, _, _ in steps), 3)
                         for s in steps[0][0].seconds}
        res["losses"] = [float(loss) for _, _, loss in steps]
    res["peak_mb"] = peak_since_reset_mb()
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--eval-limit", type=int, default=16, help="dev prompts per language and task (the demo: 16)")
    p.add_argument("--steps", type=int, default=2, help="timed MSD steps a side, after one untimed")
    p.add_argument("--rounds", type=int, default=1, help="each side this many times, the order alternating")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    name, flags = cpu_info()
    print(f"# cpu: {name}; flags: {' '.join(flags)}; torch {torch.__version__}; {load()}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for r in range(args.rounds):
        for side in (list(SIDES) if r % 2 == 0 else list(SIDES)[::-1]):
            cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--eval-limit", str(args.eval_limit),
                   "--steps", str(args.steps)]
            out = subprocess.run(cmd, env={**env, "POLYALIGN_CPU_MALLOC": SIDES[side]}, capture_output=True,
                                 text=True, check=True).stdout
            res = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:])
            runs[side].append(res)
            print(f"# {side} (round {r + 1}): kept={res['kept']} bf16 product ms {res['product_ms']}, evaluation {res['eval_s']:.2f} s, MSD steps "
                  f"{res['step_s']} s, stages {res['stages']}, losses {[round(x, 6) for x in res['losses']]}, "
                  f"peak {res['peak_mb']:.0f} MB ({load()})", flush=True)
    med = {side: (statistics.median(x["eval_s"] for x in rs),
                  statistics.median(t for x in rs for t in x["step_s"]),
                  max(x["peak_mb"] for x in rs)) for side, rs in runs.items()}
    (e0, s0, m0), (e1, s1, m1) = med["as it comes"], med["kept"]
    same_text = len({x["eval_sha"] for rs in runs.values() for x in rs}) == 1
    same_loss = len({tuple(x["losses"]) for rs in runs.values() for x in rs}) == 1
    print(f"evaluation: as it comes {e0:.2f} s, kept {e1:.2f} s; ratio cpu_malloc_eval_speedup {e0 / e1:.3f}")
    print(f"MSD step (median): as it comes {s0:.2f} s, kept {s1:.2f} s; ratio cpu_malloc_msd_step_speedup {s0 / s1:.3f}")
    print(f"peak resident: as it comes {m0:.0f} MB, kept {m1:.0f} MB")
    print(f"same generations on both sides: {same_text}; same losses: {same_loss}")


if __name__ == "__main__":
    main()
