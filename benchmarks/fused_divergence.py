"""The MSD loss from final hidden states, fused LM head vs full logits: forward + backward time and peak memory.

Both sides compute the same loss (DPSW on, reverse KL) from the same random student / teacher hidden
states [B, T, H] and head [V, H], gradient w.r.t. the student hidden states (the LoRA case: frozen head):

* unfused: logits = h @ W^T for student and teacher ([B, T, V] each), then ``msd_loss``;
* fused:   ``fused_token_divergence`` (logits a chunk of rows at a time, [N, H] saved for backward).

Each measurement runs in a fresh subprocess (sides alternate within a repetition) so that its peak
resident memory is its own; memory is the step's peak above what was resident once the inputs were
built (Linux: VmHWM reset by ``clear_refs``; elsewhere ``ru_maxrss``, which may count building the inputs). The time
ratio is of wall-clock medians; CPU seconds are printed too (less sensitive to a shared machine).

    python benchmarks/fused_divergence.py                               # [4, 512], H 896, V 151936 (Qwen2.5-0.5B), fp32
    python benchmarks/fused_divergence.py --shape 2,8 --vocab 1000      # smoke
    python benchmarks/fused_divergence.py --dtype bfloat16 --baseline-tree ../old   # + the fused side of
        # another checkout (e.g. a `git worktree` of an older commit), same inputs: commit against commit
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from run import peak_since_reset_mb, resident_mb

SIDES = ("fused", "unfused")
BASELINE = "fused_baseline_tree"      # the fused side run with another checkout's polyalign


def measure(side: str, shape: tuple[int, int], hidden: int, vocab: int, dtype: str = "float32",
            chunk: int | None = None) -> dict[str, float]:
    """One forward + backward of ``side`` in this process: wall and CPU seconds, loss, peak RSS (MiB)
    after building the inputs and after the step."""
    from polyalign.losses.msd import (
        fused_token_divergence,
        mean_over_valid,
        msd_loss,
        normalize_weights,
        reduce_sequences,
    )

    g = torch.Generator().manual_seed(0)
    B, T = shape
    dt = getattr(torch, dtype)                                     # the model's dtype: hidden states and head
    h_s = torch.randn(B, T, hidden, generator=g).to(dt).requires_grad_()
    h_t = torch.randn(B, T, hidden, generator=g).to(dt)
    weight = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).to(dt)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, : T // 4] = False                                     # some padding
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    resident = resident_mb()         # Linux: resident now, and the peak counted afresh from here
    t0, c0 = time.perf_counter(), time.process_time()
    if side in ("fused", BASELINE):
        d, raw = fused_token_divergence(h_s, h_t, weight, chunk=chunk)
        per_seq, valid = reduce_sequences(d, normalize_weights(raw, mask), mask)
        loss = mean_over_valid(per_seq, valid, h_s)
    else:
        with torch.no_grad():
            teacher_logits = h_t @ weight.T                          # [B, T, V]
        loss = msd_loss(h_s @ weight.T, teacher_logits, mask)
    loss.backward()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step_peak = peak_since_reset_mb()
    if resident is not None and step_peak is not None:   # the step's own peak, not building the inputs'
        base, peak = resident, step_peak
    return {"seconds": seconds, "cpu_seconds": cpu, "loss": float(loss.detach()), "inputs_mib": base, "peak_mib": peak,
            "grad_norm": float(h_s.grad.double().norm())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="4,512", help="B,T response tokens")
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--baseline-tree", default=None, help="also time the fused side with this checkout's polyalign")
    p.add_argument("--chunk", type=int, default=None, help="rows of logits the fused side holds at once "
                   "(default: polyalign.losses.msd.CHUNK_ROWS)")
    p.add_argument("--side", choices=[*SIDES, BASELINE], help=argparse.SUPPRESS)   # internal: one measurement
    args = p.parse_args()
    shape = tuple(int(x) for x in args.shape.split(","))
    if args.side:
        print(json.dumps(measure(args.side, shape, args.hidden, args.vocab, args.dtype, args.chunk)))
        return
    root = str(Path(__file__).resolve().parents[1])                     # this checkout's polyalign
    sides = (*SIDES, BASELINE) if args.baseline_tree else SIDES
    trees = {s: str(Path(args.baseline_tree).resolve()) if s == BASELINE else root for s in sides}
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in sides}
    for rep in range(args.reps):
        for side in sides if rep % 2 == 0 else sides[::-1]:           # alternate which side goes first
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [trees[side], os.environ.get("PYTHONPATH")]))}
            out = subprocess.run([sys.executable, __file__, "--side", side, "--shape", args.shape, "--dtype", args.dtype,
                                  "--hidden", str(args.hidden), "--vocab", str(args.vocab)]
                                 + (["--chunk", str(args.chunk)] if args.chunk else []),
                                 capture_output=True, text=True, check=True, env=env)
            runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {s: {k: statistics.median(r[k] for r in runs[s]) for k in runs[s][0]} for s in sides}
    f, u = med["fused"], med["unfused"]
    print(f"# MSD loss (reverse KL, DPSW) forward+backward from hidden states {list(shape)} x H {args.hidden}, "
          f"V {args.vocab}, {args.dtype}, {torch.get_num_threads()} threads, median of {args.reps}")
    print(f"# loss fused {f['loss']:.6f} unfused {u['loss']:.6f}; |grad| fused {f['grad_norm']:.6f} "
          f"unfused {u['grad_norm']:.6f}")
    for s in sides:
        m = med[s]
        print(f"# {s}: {m['seconds']:.2f} s ({m['cpu_seconds']:.2f} s CPU), peak RSS {m['peak_mib']:.0f} MiB "
              f"({m['peak_mib'] - m['inputs_mib']:.0f} MiB above the inputs)")
    print(f"ratio fused_vs_unfused_time {f['seconds'] / u['seconds']:.3f}")
    print(f"ratio fused_vs_unfused_peak_memory {(f['peak_mib'] - f['inputs_mib']) / (u['peak_mib'] - u['inputs_mib']):.3f}")
    if args.baseline_tree:
        b = med[BASELINE]
        print(f"# baseline tree {args.baseline_tree}: loss {b['loss']:.6f} |grad| {b['grad_norm']:.6f}")
        print(f"ratio fused_baseline_tree_vs_fused_time {b['seconds'] / f['seconds']:.3f}")


if __name__ == "__main__":
    main()
