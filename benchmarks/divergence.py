"""The MSD divergence alone: polyalign's chunked reverse KL vs TRL SDFT's full-logit loss, forward +
backward on the same [B, T, V] logits, the two timed alternately in one process.

    python benchmarks/divergence.py                       # [4, 64, 151936], Qwen2.5's vocabulary
    python benchmarks/divergence.py --shape 2,4,1000      # smoke
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="4,64,151936")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    from trl.experimental.sdft.loss_utils import compute_full_logit_self_distillation_loss

    from polyalign.losses.msd import token_divergence

    torch.manual_seed(0)
    shape = tuple(int(x) for x in args.shape.split(","))
    student, teacher = torch.randn(shape), torch.randn(shape)
    sides = {"ours": lambda s: token_divergence(s, teacher),
             "trl_sdft": lambda s: compute_full_logit_self_distillation_loss(s, teacher, distillation_alpha=1.0)}
    times: dict[str, list[float]] = {k: [] for k in sides}
    for rep in range(args.reps + 1):                       # rep 0 warms up
        for name, loss in sides.items():
            s = student.clone().requires_grad_()
            t0 = time.perf_counter()
            loss(s).sum().backward()
            if rep:
                times[name].append(time.perf_counter() - t0)
    ours, trl = (statistics.median(times[k]) for k in sides)
    print(f"# divergence forward+backward on {list(shape)} fp32: ours {ours:.3f} s, TRL SDFT full-logit {trl:.3f} s")
    print(f"ratio divergence_time_vs_trl_sdft {ours / trl:.3f}")


if __name__ == "__main__":
    main()
