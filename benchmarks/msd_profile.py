"""Where one MSD training step's time goes, on the demo's recipe (issue #26).

    python benchmarks/msd_profile.py                            # 0.5B, recipes/msd_selective.yaml, fast step
    python benchmarks/msd_profile.py --compare 2                # legacy and fast steps interleaved: both tables + ratio
    python benchmarks/msd_profile.py --compare 3 --seeds 3      # each pair of steps with its own sampling seed
    python benchmarks/msd_profile.py --compare 3 --seeds 3 --dtype float32   # the same with the base in fp32
    python benchmarks/msd_profile.py --check 2                  # train 2 steps each way from one seed: max |diff|
    python benchmarks/msd_profile.py --dtypes 3 --seeds 3       # fast step in fp32 and bf16, alternating: both tables + ratio
    python benchmarks/msd_profile.py --ops 6                    # + one step under torch.profiler: operators by stage
    python benchmarks/msd_profile.py --one-pass-lora 3 --seeds 3  # LoRA layers on PEFT's forward vs lora_add's, alternating
    python benchmarks/msd_profile.py --model builtin:tiny-random --batch 4 --max-new-tokens 8 --compare 1   # smoke

Per stage of one step (sampling, teacher forward, student forward, head + divergence, backward,
optimizer): wall seconds, share of the step, achieved FLOP/s against this machine's measured matmul
peak in the dtype the policy uses (best of five 2048^3 matmuls, ``precision.matmul_peak``), and the
share of the tokens the stage computes that are padding. Prints the CPU model, its vector / matrix
flags and the load average, so a figure says what machine and how busy.

FLOP model (as ``run.py``'s): 2 N per computed token forward (N = the base's non-embedding weights
without the LM head, plus the adapter's where it is on), the backward 2 N_base + 4 N_lora per student
token (input gradients through the frozen base, both gradients of the adapter); the LM head 2 H V per
row it runs on (sampling: one row per sequence and decoding step; head + divergence: student head,
teacher head and dD/dh = three per response row). Attention scores are left out. "Computed" tokens
include the padding each path computes: one left-padded batch (legacy), length groups (fast; sampling
is one padded batch in both).

Timings of the two paths are taken in one process, their steps alternating, on the same batch, the
same adapter weights (restored after each step) and the same sampling seed, so a loaded machine's
drift hits both alike. The legacy step draws its tokens as the step before issue #26 did
(``torch.multinomial``); the fast step as the recipe says (``msd.draw``, default ``inverse_cdf``:
the same distribution, other tokens at one seed). ``--draw multinomial`` gives the fast step the
legacy draw, so that ``--compare`` also checks responses, loss and gradients equal across the paths.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

STAGES = ["sampling", "teacher forward", "student forward", "head + divergence", "backward", "optimizer"]
FLAG_WORDS = ("avx2", "avx512", "amx", "bf16", "fma", "vnni")


def cpu_info() -> tuple[str, list[str]]:
    """(model name, the flags that decide matmul speed: AVX2 / AVX-512 / AMX / bf16 / FMA / VNNI)."""
    model, flags = "unknown", []
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = sorted(f for f in value.split() if any(w in f for w in FLAG_WORDS))
    return model, flags


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


class StageClock:
    """``trainer.stage_clock``: ``clock(name)`` times a stage; ``record(...)`` keeps the step's token lists."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.info: dict[str, Any] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            with torch.profiler.record_function(f"stage: {name}"):     # --ops attributes operators to stages
                yield
        finally:
            self.seconds[name] += time.perf_counter() - t0

    def record(self, **info: Any) -> None:
        self.info.update(info)


def build_trainer(args: argparse.Namespace, out: str, dtype: str | None = None):
    """The recipe's trainer exactly as ``run_recipe`` builds it (same seeding order), optimizer ready;
    ``dtype``: the base model's dtype instead of the policy's (the adapter stays fp32)."""
    from transformers import set_seed

    from polyalign.data.builtin import load_prompts
    from polyalign.train.msd_config import MSDConfig
    from polyalign.train.msd_trainer import MSDTrainer, build_msd_examples
    from polyalign.train.recipes import build_model, load_recipe, training_arguments

    overrides = [f"model={args.model}", f"output_dir={out}", f"max_steps={max(args.check, 1)}"]
    if args.batch:
        overrides.append(f"per_device_train_batch_size={args.batch}")
    if args.max_new_tokens:
        overrides.append(f"msd.max_new_tokens={args.max_new_tokens}")
    if dtype:
        overrides.append(f"dtype={dtype}")
    overrides += list(getattr(args, "overrides", None) or [])
    r = load_recipe(args.recipe, overrides)
    r.training.update(save_strategy="no", disable_tqdm=True)
    set_seed(r.seed)
    model, tok = build_model(r)
    records = load_prompts(r.data.source, r.data.format, r.data.split, r.data.limit, r.data.category, r.seed)
    if r.data.benign_source:
        records = records + load_prompts(r.data.benign_source, None, r.data.split, r.data.benign_limit, seed=r.seed)
    cfg = MSDConfig(**r.msd)
    trainer = MSDTrainer(model, training_arguments(r), cfg, build_msd_examples(records, cfg), tok)
    trainer.share_prefill = not getattr(args, "no_share_prefill", False)
    trainer.share_head = not getattr(args, "no_share_head", False)
    return trainer, r


def stepping_trainer(args: argparse.Namespace, out: str, steps: int, dtype: str | None = None):
    """:func:`build_trainer`, ready for ``steps`` timed ``training_step`` calls outside ``train()``:
    optimizer and schedule made, one micro-batch a step, training mode."""
    trainer, r = build_trainer(args, out, dtype=dtype)
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    trainer.current_gradient_accumulation_steps = 1    # set by the train loop; we call training_step directly
    trainer.model.train()
    return trainer, r


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def timed_step(trainer: Any, batch: dict, legacy: bool, seed: int, draw: str) -> tuple[StageClock, float, float]:
    """One optimizer step (training_step, optimizer, scheduler) timed by stage: (clock, seconds, loss).
    The legacy step draws with ``multinomial``, the fast one with ``draw``."""
    clock = StageClock()
    trainer.legacy_step, trainer.stage_clock = legacy, clock
    trainer.msd.draw = "multinomial" if legacy else draw
    backward = trainer.accelerator.backward

    def timed_backward(loss: Any, **kw: Any) -> None:
        with clock("backward"):
            backward(loss, **kw)

    trainer.accelerator.backward = timed_backward
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    try:
        loss = float(trainer.training_step(trainer.model, dict(batch)))
        clock.record(grads={n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()
                            if p.grad is not None})
        with clock("optimizer"):
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
            trainer.model.zero_grad(set_to_none=True)
    finally:
        trainer.accelerator.backward = backward
        trainer.stage_clock = None
    return clock, time.perf_counter() - t0, loss


def step_from(trainer: Any, batch: dict, start: dict[str, torch.Tensor], legacy: bool, seed: int,
              draw: str) -> tuple[StageClock, float, float]:
    """:func:`timed_step`, then the adapter back to ``start`` and fresh optimizer moments, so that
    every timed step starts from the same weights."""
    res = timed_step(trainer, batch, legacy, seed, draw)
    with torch.no_grad():
        for n, prm in trainer.model.named_parameters():
            if n in start:
                prm.copy_(start[n])
    trainer.optimizer.state.clear()
    return res


Step = tuple[StageClock, float, float]      # (stage clock, seconds, loss) of one timed step


def alternating(sides: list[Any], rounds: int, args: argparse.Namespace, run: Any, label: Any) -> dict[Any, list[Step]]:
    """``rounds`` rounds of one step per side, the order flipped every other round so that a loaded
    machine's drift hits every side alike; round k samples with seed ``args.seed + k mod args.seeds``."""
    reps: dict[Any, list[Step]] = {s: [] for s in sides}
    for k in range(rounds):
        for side in (sides if k % 2 == 0 else sides[::-1]):
            seed = args.seed + (k % args.seeds)
            reps[side].append(run(side, seed))
            clock, sec, loss = reps[side][-1]
            lens = [len(y) for y in clock.info["responses"]]
            print(f"# {label(side)} step {k + 1} (seed {seed}): {sec:.2f} s, loss {loss:.6g}, {sum(lens)} response "
                  f"tokens, longest {max(lens)} ({load()})", flush=True)
    return reps


def medians(runs: list[Step]) -> tuple[float, dict[str, float]]:
    """(median step seconds, median seconds of each stage) over the runs."""
    return (statistics.median(t for _, t, _ in runs),
            {s: statistics.median(c.seconds.get(s, 0.0) for c, _, _ in runs) for s in STAGES})


def model_sizes(model: Any) -> dict[str, int]:
    """Non-embedding base weights without the head, adapter weights, H and V."""
    head = model.get_output_embeddings().weight
    emb = model.get_input_embeddings().weight
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    base = sum(p.numel() for n, p in model.named_parameters()
               if "lora_" not in n and p is not emb and p is not head and p.dim() > 1)
    return {"base": base, "lora": lora, "H": head.shape[1], "V": head.shape[0]}


def work(info: dict[str, Any], sizes: dict[str, int], legacy: bool) -> dict[str, tuple[float, float]]:
    """Per stage: (model FLOPs, padding share of the tokens computed) for the recorded step. A shared
    head (``info["shared_head"]``: the prompts' common first tokens run once) counts once."""
    from polyalign.models.batching import length_buckets, shared_head_length

    sp, tp, ys = info["student_prompts"], info["teacher_prompts"], info["responses"]
    B, n_resp = len(ys), sum(len(y) for y in ys)
    R = max(1, max(len(y) for y in ys))
    n_base, n_lora, hv = sizes["base"], sizes["lora"], sizes["H"] * sizes["V"]
    shared = bool(info.get("shared_head")) and not legacy

    def computed(prompts: list[list[int]]) -> tuple[int, int]:
        n = shared_head_length(prompts) if shared and any(ys) else 0
        lengths = [len(p) - n + len(y) for p, y in zip(prompts, ys)]
        if legacy:
            return len(lengths) * max(lengths), sum(lengths)
        groups = length_buckets(lengths, 16)
        return sum(len(g) * max(lengths[i] for i in g) for g in groups) + n, sum(lengths) + n

    P = max(len(p) for p in sp)
    gen_computed = B * P + B * (R - 1)                    # prefill, then one token per row per decoding step
    gen_real = sum(len(p) for p in sp) + sum(max(len(y) - 1, 0) for y in ys)
    t_comp, t_real = computed(tp)
    s_comp, s_real = computed(sp)
    if info.get("shared_prefill") and not legacy:
        # the prompt but its last token ran once, in the student forward (prompt_prefix's length groups);
        # sampling computes the last prompt token and the decoding steps; the student forward's second
        # part runs last prompt token + response but its last token (prefixed_response_hidden's groups)
        gen_computed, gen_real = B + B * (R - 1), B + sum(max(len(y) - 1, 0) for y in ys)
        n = shared_head_length([p[:-1] for p in sp]) if shared else 0
        pre = [len(p) - 1 - n for p in sp]
        resp = [len(y) for y in ys if y]
        s_comp = (sum(len(g) * max(pre[i] for i in g) for g in length_buckets(pre, 16)) + n
                  + sum(len(g) * max(resp[i] for i in g) for g in length_buckets(resp, 16)))
        s_real = sum(pre) + n + sum(resp)
    head_rows = B * R if legacy else n_resp
    return {
        "sampling": (2 * (n_base + n_lora) * gen_computed + 2 * hv * B * R, 1 - gen_real / gen_computed),
        "teacher forward": (2 * n_base * t_comp, 1 - t_real / t_comp),
        "student forward": (2 * (n_base + n_lora) * s_comp, 1 - s_real / s_comp),
        "head + divergence": (3 * 2 * hv * head_rows, 1 - n_resp / head_rows),
        "backward": ((2 * n_base + 4 * n_lora) * s_comp, 1 - s_real / s_comp),
        "optimizer": (0.0, 0.0),
    }


def table(name: str, seconds: dict[str, float], total: float, flops: dict[str, tuple[float, float]],
          peak: float) -> str:
    rows = [f"{name}", "", "| stage | seconds | share | GFLOP/s | of matmul peak | padding |", "|---|---|---|---|---|---|"]
    for stage in STAGES:
        sec = seconds.get(stage, 0.0)
        f, pad = flops[stage]
        rate = f / sec if sec > 0 and f else 0.0
        rows.append(f"| {stage} | {sec:.2f} | {sec / total:.1%} | "
                    + (f"{rate / 1e9:.1f} | {rate / peak:.2f} | {pad:.0%} |" if f else "- | - | - |"))
    other = total - sum(seconds.get(s, 0.0) for s in STAGES)
    rows.append(f"| other (tokenising, DPSW, logging) | {other:.2f} | {other / total:.1%} | - | - | - |")
    rows.append(f"| step | {total:.2f} | 100% | {sum(f for f, _ in flops.values()) / total / 1e9:.1f} | "
                f"{sum(f for f, _ in flops.values()) / total / peak:.2f} | - |")
    return "\n".join(rows)


def read_bandwidth(gib: float = 1.0, trials: int = 5) -> float:
    """Bytes/s of reading memory: best of ``trials`` sums over a ``gib`` GiB fp32 tensor (all threads)."""
    x = torch.ones(int(gib * (1 << 30)) // 4)
    x.sum()
    best = 0.0
    for _ in range(trials):
        t0 = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t0))
    return best


def sampling_floor(model: Any, decode_steps: int, bandwidth: float, took: float) -> str:
    """What the sampling stage cannot go below on this machine: each decode step reads every weight the
    base holds once (LoRA folded in, in the base's dtype), so ``decode_steps`` x those bytes at the
    measured read bandwidth. An input embedding that is not the LM head's own tensor is left out (a
    step gathers one row of it per sequence); so are prefill and draw."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = {id(embed.weight)} if embed is not None and (head is None or head.weight is not embed.weight) else set()
    nbytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                 if "lora_" not in n and id(p) not in skip)
    floor = decode_steps * nbytes / bandwidth
    return (f"sampling floor: {decode_steps} decode steps x {nbytes / 1e9:.2f} GB of weights at "
            f"{bandwidth / 1e9:.1f} GB/s read = {floor:.2f} s; the stage took {took:.2f} s "
            f"({took / floor:.2f}x the floor)")


def check(args: argparse.Namespace) -> None:
    """Train ``args.check`` steps with the legacy and the fast step from the same seed; max |diff|."""
    results = {}
    for legacy in (True, False):
        with tempfile.TemporaryDirectory() as out:
            trainer, _ = build_trainer(args, out, dtype=args.dtype)
            trainer.legacy_step = legacy
            trainer.msd.draw = args.draw or trainer.msd.draw      # one draw for both: the same computation
            t0 = time.perf_counter()
            trainer.train()
            sec = time.perf_counter() - t0
            results[legacy] = ([h["loss"] for h in trainer.state.log_history if "loss" in h],
                               adapter_state(trainer.model), sec)
            print(f"# {'legacy' if legacy else 'fast'}: {args.check} steps in {sec:.1f} s, losses "
                  f"{results[legacy][0]} ({load()})", flush=True)
    (lo, wo, _), (ln, wn, _) = results[True], results[False]
    dl = max(abs(a - b) for a, b in zip(lo, ln, strict=True))
    dw = max(float((wo[n] - wn[n]).abs().max()) for n in wo)
    scale = max(float(w.abs().max()) for w in wo.values())
    print(f"check after {args.check} steps: max |loss diff| {dl:.3g} (losses {lo} vs {ln}); "
          f"max |adapter diff| {dw:.3g} (largest adapter entry {scale:.3g})")


def compare_dtypes(args: argparse.Namespace) -> None:
    """``msd_step_bf16_vs_fp32`` on the recipe: the fast step with the base model in fp32 and in bf16
    (two trainers built alike, one process), steps alternating on the same batch and sampling seeds,
    every step from the trainer's starting adapter. The sides' samples differ (bf16 rounds the
    logits), so ``--seeds`` averages over several; response tokens are printed for each step."""
    from precision import machine_peaks

    from polyalign.models.loading import cpu_has_fast_bf16, model_dtype

    dtypes = ("float32", "bfloat16")
    with tempfile.TemporaryDirectory() as out:
        sides = {}
        for d in dtypes:
            trainer, r = stepping_trainer(args, str(Path(out) / d), 2 * args.dtypes + 2, dtype=d)
            assert model_dtype(trainer.model) == d, (model_dtype(trainer.model), d)
            sides[d] = (trainer, next(iter(trainer.get_train_dataloader())), adapter_state(trainer.model),
                        model_sizes(trainer.model))
        # bf16 where the CPU emulates it: 512^3, best of 2 (a 2048^3 product takes minutes on a 2-core
        # Zen 1, and the figure is only the tables' denominator)
        peaks = machine_peaks(cpu_has_fast_bf16() or torch.cuda.is_available())
        bandwidth = read_bandwidth()
        print(f"# model {args.model}, recipe {args.recipe}: batch {r.training['per_device_train_batch_size']}, "
              f"{r.msd['max_new_tokens']} sampled tokens; matmul peak (2048^3, best of 5; emulated bf16 512^3) "
              + ", ".join(f"{d} {v / 1e9:.1f} GFLOP/s" for d, v in peaks.items())
              + f"; memory read {bandwidth / 1e9:.1f} GB/s (1 GiB sum, best of 5)", flush=True)

        def run(d: str, seed: int) -> tuple[StageClock, float, float]:
            trainer, batch, start, _ = sides[d]
            return step_from(trainer, batch, start, False, seed, args.draw or trainer.msd.draw)

        if not args.no_warmup:
            for d in dtypes:
                run(d, args.seed)
        reps = alternating(list(dtypes), args.dtypes, args, run, str)
        total = {}
        for d in dtypes:
            runs = reps[d]
            total[d], seconds = medians(runs)
            info = runs[0][0].info
            lens = [len(y) for y in info["responses"]]
            print()
            print(table(f"fast step, base in {d} (median of {len(runs)}): responses {min(lens)}-{max(lens)} tokens "
                        f"({sum(lens)} in all)", seconds, total[d], work(info, sides[d][3], False), peaks[d]))
            print(sampling_floor(sides[d][0].model, max(lens), bandwidth, seconds["sampling"]))
        print()
        print(f"ratio msd_step_bf16_vs_fp32 {total['float32'] / total['bfloat16']:.3f} "
              f"(fp32 {total['float32']:.2f} s, bf16 {total['bfloat16']:.2f} s per step)")


def compare_switch(args: argparse.Namespace, rounds: int, flip: Any, names: tuple[str, str], ratio: str,
                   exact: bool) -> None:
    """The fast step with one switch off and on (``flip(on)`` sets it; one trainer), alternating on the
    same batch, seed and starting adapter; prints both stage tables and ``ratio`` (off / on). ``exact``:
    the two must give the same responses, loss and gradients bit for bit; otherwise the largest
    relative difference of loss and gradients is printed, and whether the responses agree."""
    from precision import matmul_peak

    from polyalign.models.loading import model_dtype

    with tempfile.TemporaryDirectory() as out:
        trainer, r = stepping_trainer(args, out, 2 * rounds + 2, dtype=args.dtype)
        dtype = model_dtype(trainer.model)
        peak = matmul_peak(getattr(torch, dtype), 2048, trials=5)
        print(f"# model {args.model}, {dtype}, recipe {args.recipe}: batch "
              f"{r.training['per_device_train_batch_size']}, {r.msd['max_new_tokens']} sampled tokens; "
              f"matmul peak {peak / 1e9:.1f} GFLOP/s ({dtype}, 2048^3, best of 5)", flush=True)
        batch, start, sizes = next(iter(trainer.get_train_dataloader())), adapter_state(trainer.model), model_sizes(trainer.model)
        draw = args.draw or trainer.msd.draw

        def run(on: bool, seed: int) -> tuple[StageClock, float, float]:
            flip(trainer, on)
            try:
                return step_from(trainer, batch, start, False, seed, draw)
            finally:
                flip(trainer, True)

        sides = [False, True]
        if not args.no_warmup:
            run(True, args.seed)
        reps = alternating(sides, rounds, args, run, lambda on: names[on])
        total = {}
        for on in sides:
            runs = reps[on]
            total[on], seconds = medians(runs)
            lens = [len(y) for y in runs[0][0].info["responses"]]
            print()
            print(table(f"fast step, {names[on]} (median of {len(runs)}): responses {min(lens)}-{max(lens)} tokens",
                        seconds, total[on], work(runs[0][0].info, sizes, False), peak))
        pairs = list(zip(reps[False], reps[True], strict=True))
        same_responses = all(a[0].info["responses"] == b[0].info["responses"] for a, b in pairs)
        print()
        if exact:
            same = same_responses and all(a[2] == b[2] and all(torch.equal(a[0].info["grads"][n], b[0].info["grads"][n])
                                                               for n in a[0].info["grads"]) for a, b in pairs)
            print(f"# each pair of steps (same seed): the same responses, loss and gradients bit for bit: {same}")
        else:
            loss = max(abs(a[2] - b[2]) / max(abs(a[2]), 1e-12) for a, b in pairs)
            grad = max(float((a[0].info["grads"][n] - b[0].info["grads"][n]).abs().max()
                             / a[0].info["grads"][n].abs().max().clamp_min(1e-30))
                       for a, b in pairs for n in a[0].info["grads"])
            print(f"# each pair of steps (same seed): the same responses {same_responses}; largest relative "
                  f"difference of the loss {loss:.2e}, of a gradient (max |diff| / max |grad|, per tensor) {grad:.2e}")
        print(f"ratio {ratio} {total[False] / total[True]:.3f} "
              f"({names[False]} {total[False]:.2f} s, {names[True]} {total[True]:.2f} s per step)")


def compare_one_pass_lora(args: argparse.Namespace) -> None:
    """``msd_step_one_pass_lora_vs_peft``: the student's LoRA layers on PEFT's own forward and on
    :mod:`polyalign.models.lora_add`'s one-pass sum (the switch ``lora_add.ENABLED``); the two must
    give the same responses, loss and gradients bit for bit."""
    from polyalign.models import lora_add

    def flip(_trainer: Any, on: bool) -> None:
        lora_add.ENABLED = on

    compare_switch(args, args.one_pass_lora, flip, ("PEFT's forward", "the one-pass sum"),
                   "msd_step_one_pass_lora_vs_peft", exact=True)


def compare_share_head(args: argparse.Namespace) -> None:
    """``msd_step_shared_head_vs_not``: the fast step's forwards with the prompts' common first tokens
    (the chat template's system turn) run once for the batch or in every row
    (``MSDTrainer.share_head``); the same numbers up to float rounding."""
    def flip(trainer: Any, on: bool) -> None:
        trainer.share_head = on

    compare_switch(args, args.share_head, flip, ("head in every row", "head shared"), "msd_step_shared_head_vs_not",
                   exact=False)


MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear"}
ATTENTION = {"softmax", "_softmax", "_safe_softmax"}
COPIES = {"to", "_to_copy", "copy_", "contiguous", "clone", "cat", "index", "index_select", "gather", "scatter",
          "embedding", "slice", "select", "narrow", "stack"}
KINDS = ["matmul", "attention", "cast / copy", "other (norms, activations, elementwise)"]


def op_kind(name: str) -> str:
    """Which of ``KINDS`` an operator is (``--ops``)."""
    short = name.removeprefix("aten::")
    if short in MATMULS or "mkldnn" in short or "onednn" in short:
        return KINDS[0]
    if short in ATTENTION or "scaled_dot_product" in short:
        return KINDS[1]
    if short in COPIES:
        return KINDS[2]
    return KINDS[3]


def op_tables(prof: Any, top: int, wall: dict[str, float]) -> str:
    """Operators' self CPU time by stage (an operator belongs to the stage whose range holds its
    start), by kind and the ``top`` largest; the stages' ranges are StageClock's record_function marks."""
    events = prof.events()
    spans = [(e.name.removeprefix("stage: "), e.time_range.start, e.time_range.end)
             for e in events if e.name.startswith("stage: ")]
    by_stage: dict[str, dict[tuple[str, str], float]] = defaultdict(lambda: defaultdict(float))
    for e in events:
        if e.name.startswith("stage: ") or e.device_type.name != "CPU":
            continue
        where = next((n for n, a, b in spans if a <= e.time_range.start < b), "other")
        shapes = ",".join(str(list(x)) for x in (e.input_shapes or []) if x)
        by_stage[where][(e.name, shapes)] += e.self_cpu_time_total / 1e6
    rows = ["| stage | wall s | operators' self time, s | " + " | ".join(KINDS) + " |", "|---" * (len(KINDS) + 3) + "|"]
    lines = []
    for stage in [*STAGES, "other"]:
        ops = by_stage.get(stage)
        if not ops:
            continue
        total = sum(ops.values())
        share = defaultdict(float)
        for (name, _), sec in ops.items():
            share[op_kind(name)] += sec
        rows.append(f"| {stage} | {wall.get(stage, 0.0):.2f} | {total:.2f} | " + " | ".join(f"{share[k] / total:.0%}" for k in KINDS) + " |")
        biggest = sorted(ops.items(), key=lambda kv: -kv[1])[:top]
        lines.append(f"- {stage}: " + "; ".join(f"{n.removeprefix('aten::')} {shp[:60]} {s:.2f}" for (n, shp), s in biggest))
    return "\n".join(rows + ["", f"largest {top} operators per stage, by input shapes (self seconds):", *lines])


def profile_ops(trainer: Any, batch: dict, start: dict[str, torch.Tensor], seed: int, draw: str, top: int) -> None:
    """One step under torch.profiler: where the time inside each stage goes, by operator."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        clock, sec, _ = step_from(trainer, batch, start, False, seed, draw)
    print(f"\n# one fast step under torch.profiler: {sec:.2f} s (the profiler's own overhead included); "
          "wall minus operators' time = Python, the profiler, idle threads; shares are of operators' time")
    print(op_tables(prof, top, clock.seconds))


def flop_model(args: argparse.Namespace) -> None:
    """No timing: model FLOPs of every step of the recipe (its ``max_steps`` batches, in the trainer's
    order, every response at ``max_new_tokens``), legacy vs new: what the new step removes where
    FLOP/s are the same for both (an idle CPU)."""
    from polyalign.train.recipes import load_recipe

    steps = int(load_recipe(args.recipe).training.get("max_steps", 1))
    with tempfile.TemporaryDirectory() as out:
        trainer, r = build_trainer(args, out, dtype=args.dtype)
        sizes = model_sizes(trainer.model)
        total = {True: defaultdict(float), False: defaultdict(float)}
        for _, batch in zip(range(steps), trainer.get_train_dataloader()):
            sp, tp = trainer._prompts(batch["examples"])
            info = {"student_prompts": sp, "teacher_prompts": tp, "shared_prefill": trainer.share_prefill,
                    "responses": [[0] * r.msd["max_new_tokens"]] * len(sp)}
            for legacy in (True, False):
                for stage, (f, _) in work(info, sizes, legacy).items():
                    total[legacy][stage] += f
    print(f"# sizes: {sizes}")
    for legacy in (True, False):
        print(f"{'legacy' if legacy else 'new'}: {steps} steps " + ", ".join(
            f"{k} {v / 1e12:.2f}" for k, v in total[legacy].items()) + f" TFLOP; total {sum(total[legacy].values()) / 1e12:.1f}")
    print(f"ratio msd_step_flops_legacy_vs_new {sum(total[True].values()) / sum(total[False].values()):.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--recipe", default="msd_selective")
    p.add_argument("--batch", type=int, default=None, help="per_device_train_batch_size (default: the recipe's)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="msd.max_new_tokens (default: the recipe's)")
    p.add_argument("--legacy", action="store_true", help="profile the step before issue #26 (no --compare)")
    p.add_argument("--compare", type=int, default=0, help="K: K legacy and K fast steps, alternating")
    p.add_argument("--dtypes", type=int, default=0,
                   help="K: K fast steps with an fp32 base and K with a bf16 base, alternating (two trainers, one "
                        "process): both tables + ratio msd_step_bf16_vs_fp32")
    p.add_argument("--check", type=int, default=0, help="S: train S steps each way from one seed, print max |diff|")
    p.add_argument("--flop-model", action="store_true", help="no timing: FLOPs of every step of the recipe, legacy vs new")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-share-prefill", action="store_true",
                   help="the fast step with the student's prompt run twice (generate's prefill, then training)")
    p.add_argument("--no-share-head", action="store_true",
                   help="the fast step with the prompts' common head (the template's system turn) in every row")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--seeds", type=int, default=1,
                   help="N: repeat k samples with seed + k mod N, on both sides (the draws differ: average over samples)")
    p.add_argument("--draw", choices=["multinomial", "inverse_cdf"], default=None,
                   help="the fast step's token draw (default: the recipe's msd.draw); the legacy step's is multinomial")
    p.add_argument("--ops", type=int, default=0,
                   help="N: after the timed steps, one more under torch.profiler: operators' time by stage and kind, top N")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed first step (a loaded machine, short on time)")
    p.add_argument("--one-pass-lora", type=int, default=0,
                   help="K: K fast steps with PEFT's LoRA forward and K with polyalign.models.lora_add's, alternating: "
                        "both tables + ratio msd_step_one_pass_lora_vs_peft, and whether they compute the same")
    p.add_argument("--share-head", type=int, default=0,
                   help="K: K fast steps with the prompts' common head in every row and K with it run once, "
                        "alternating; both tables + ratio msd_step_shared_head_vs_not")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="the base's dtype (default: the policy's; --dtypes runs both)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from precision import matmul_peak

    from polyalign.models.loading import model_dtype

    model_name, flags = cpu_info()
    print(f"# cpu: {model_name}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}")
    print(f"# flags: {' '.join(flags) or '(none of ' + '/'.join(FLAG_WORDS) + ')'}")
    print(f"# {load()} at start; torch {torch.__version__}", flush=True)
    if args.flop_model:
        flop_model(args)
        return
    if args.check:
        check(args)
        print(f"# {load()} at end")
        return
    if args.one_pass_lora:
        compare_one_pass_lora(args)
        print(f"# {load()} at end")
        return
    if args.share_head:
        compare_share_head(args)
        print(f"# {load()} at end")
        return
    if args.dtypes:
        compare_dtypes(args)
        print(f"# {load()} at end")
        return
    with tempfile.TemporaryDirectory() as out:
        trainer, r = stepping_trainer(args, out, max(2 * args.compare, 2) + 1, dtype=args.dtype)
        dtype = model_dtype(trainer.model)
        peak = matmul_peak(getattr(torch, dtype), 2048, trials=5)
        bandwidth = read_bandwidth()
        print(f"# model {args.model}, {dtype}, recipe {args.recipe}: batch "
              f"{r.training['per_device_train_batch_size']}, {r.msd['max_new_tokens']} sampled tokens; "
              f"matmul peak {peak / 1e9:.1f} GFLOP/s ({dtype}, 2048^3, best of 5); memory read "
              f"{bandwidth / 1e9:.1f} GB/s (1 GiB sum, best of 5)", flush=True)
        batch = next(iter(trainer.get_train_dataloader()))
        fast_draw = args.draw or trainer.msd.draw
        print(f"# draws: legacy multinomial, fast {fast_draw}", flush=True)
        sizes = model_sizes(trainer.model)
        start = adapter_state(trainer.model)

        def run(legacy: bool, seed: int) -> tuple[StageClock, float, float]:
            return step_from(trainer, batch, start, legacy, seed, fast_draw)

        sides = [True, False] if args.compare else [args.legacy]
        if not args.no_warmup:
            run(sides[-1], args.seed)                      # warm-up (allocator, first-call costs)
        reps = alternating(sides, max(args.compare, 1), args, run, lambda legacy: "legacy" if legacy else "fast")
        for legacy in sides:
            runs = reps[legacy]
            total, seconds = medians(runs)
            info = runs[0][0].info
            lens = [len(y) for y in info["responses"]]
            print()
            print(table(f"{'legacy' if legacy else 'fast'} step (median of {len(runs)}): responses "
                        f"{min(lens)}-{max(lens)} tokens ({sum(lens)} in all), student prompts "
                        f"{min(map(len, info['student_prompts']))}-{max(map(len, info['student_prompts']))}, "
                        f"teacher prompts {min(map(len, info['teacher_prompts']))}-"
                        f"{max(map(len, info['teacher_prompts']))}",
                        seconds, total, work(info, sizes, legacy), peak))
            if not legacy:
                print(sampling_floor(trainer.model, max(lens), bandwidth, seconds["sampling"]))
        if args.ops:
            profile_ops(trainer, batch, start, args.seed, fast_draw, args.ops)
        if args.compare:
            old, new = (medians(reps[s])[0] for s in (True, False))
            print()
            print(f"ratio msd_step_legacy_vs_fast {old / new:.3f} (legacy {old:.2f} s, fast {new:.2f} s per step)")
            (c_old, _, l_old), (c_new, _, l_new) = reps[True][0], reps[False][0]
            g_old, g_new = c_old.info["grads"], c_new.info["grads"]
            dg = max(float((g_old[n] - g_new[n]).abs().max()) for n in g_old)
            gmax = max(float(g.abs().max()) for g in g_old.values())
            same = c_old.info["responses"] == c_new.info["responses"]
            print(f"# same batch and seed, one step from the same adapter (draws: multinomial / {fast_draw}): "
                  f"responses identical: {same}; "
                  f"|loss diff| {abs(l_old - l_new):.3g} (loss {l_old:.6g}); max |grad diff| {dg:.3g} "
                  f"(largest grad entry {gmax:.3g})")
    print(f"# {load()} at end")


if __name__ == "__main__":
    main()
