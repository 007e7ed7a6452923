"""Precision and adapter benchmarks: bf16 vs fp32 on evaluation's generation path and on a whole
on-policy MSD step, the machine's matmul peak over every dtype it has, and adapter vs base
evaluation. Each ratio is measured side by side in one process, the sides alternating.

    python benchmarks/precision.py --model builtin:qwen2.5-coder-0.5b-instruct   # called by run.py

Where the CPU has no native bf16 (no AVX512-BF16 / AMX flag), oneDNN emulates bf16 and is orders
of magnitude slower than fp32: the bf16 sides then run at a reduced size (printed), enough to
measure the ratio that made the dtype policy pick fp32 there.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def matmul_peak(dtype: torch.dtype, n: int, trials: int = 3) -> float:
    """Best of ``trials`` timings of one n^3 matmul, FLOP/s."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(trials):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def machine_peaks(fast_bf16: bool, n: int = 2048) -> dict[str, float]:
    """FLOP/s of the best matmul per dtype this machine has (bf16 at n=512 where it is emulated)."""
    return {"float32": matmul_peak(torch.float32, n, trials=5),
            "bfloat16": matmul_peak(torch.bfloat16, n if fast_bf16 else 512, trials=5 if fast_bf16 else 2)}


def benchmark_prompts(n: int) -> list:
    """About n benign eval prompts of the built-in benchmark, language-major over en zh th sw."""
    from polyalign.data.builtin import builtin_benchmark
    from polyalign.eval.generation import GenRequest

    langs = ("en", "zh", "th", "sw")
    recs = builtin_benchmark("benign", "eval")[: max(1, n // len(langs))]
    return [GenRequest(r.id, lang, r.texts[lang]) for lang in langs for r in recs]


def generation_tokens_per_second(model, tok, reqs, max_new_tokens: int, name: str) -> float:
    """Evaluation's own path (generate_cached, HFGenerator's default batch, fresh cache)."""
    from polyalign.eval.generation import GenerationCache, GenerationSettings, HFGenerator, generate_cached
    from polyalign.eval.runner import merged_for_generation

    with tempfile.TemporaryDirectory() as tmp, merged_for_generation(model):
        t0 = time.perf_counter()
        rows, _, _ = generate_cached(HFGenerator(model, tok), reqs, GenerationSettings(max_new_tokens=max_new_tokens),
                                     GenerationCache(Path(tmp) / "generations.jsonl"), fingerprint=name)
        sec = time.perf_counter() - t0
    return sum(len(tok(r["response"], add_special_tokens=False)["input_ids"]) for r in rows.values()) / sec


def bench_eval_dtype(model_spec: str, n_prompts: int, max_new_tokens: int, reps: int = 2) -> dict:
    from polyalign.models import load_model, load_tokenizer

    tok = load_tokenizer(model_spec)
    models = {d: load_model(model_spec, dtype=d) for d in ("float32", "bfloat16")}
    reqs = benchmark_prompts(n_prompts)
    times: dict[str, list[float]] = {d: [] for d in models}
    for _ in range(reps):
        for d, m in models.items():
            times[d].append(generation_tokens_per_second(m, tok, reqs, max_new_tokens, d))
    return {d: statistics.median(v) for d, v in times.items()} | {"n_prompts": len(reqs), "tokens": max_new_tokens}


def msd_step_seconds(trainer, batch) -> float:
    t0 = time.perf_counter()
    trainer.training_step(trainer.model, batch)
    return time.perf_counter() - t0


def bench_msd_step_dtype(model_spec: str, batch: int, new_tokens: int, reps: int = 2) -> dict:
    """A whole on-policy MSD step (sampling, student and teacher forwards, backward, DPSW) in each
    dtype: LoRA adapter fp32 on a base in that dtype, as training runs it."""
    from polyalign.data.builtin import builtin_benchmark
    from polyalign.train.msd_config import MSDConfig
    from polyalign.train.msd_trainer import MSDTrainer, build_msd_examples
    from polyalign.train.recipes import Recipe, build_model, training_arguments

    recs = builtin_benchmark("harmful", "train")[:batch]
    trainers = {}
    for dtype in ("float32", "bfloat16"):
        r = Recipe(method="msd", model=model_spec, output_dir=tempfile.mkdtemp(prefix=f"polyalign-prec-{dtype}-"),
                   dtype=dtype, msd={"student_languages": ["th"], "max_new_tokens": new_tokens, "temperature": 0},
                   lora={"r": 16, "alpha": 32}, training={"per_device_train_batch_size": batch, "max_steps": 1})
        torch.manual_seed(0)
        model, tok = build_model(r)
        cfg = MSDConfig(**r.msd)
        t = MSDTrainer(model, training_arguments(r), cfg, build_msd_examples(recs, cfg), tok)
        t.create_optimizer_and_scheduler(num_training_steps=10)
        t.current_gradient_accumulation_steps = 1
        trainers[dtype] = (t, t.data_collator(list(t.train_dataset)[:batch]))
    times: dict[str, list[float]] = {d: [] for d in trainers}
    for _ in range(reps + 1):                      # the first round warms up
        for d, (t, b) in trainers.items():
            times[d].append(msd_step_seconds(t, dict(b)))
    return {d: statistics.median(v[1:]) for d, v in times.items()}


def bench_adapter_vs_base(model_spec: str, n_prompts: int, max_new_tokens: int, reps: int = 2) -> dict:
    """Evaluation of the base vs the same base with a LoRA adapter (non-zero, all linear layers, r=16),
    in the policy dtype, through evaluation's path (which merges the adapter while generating)."""
    from polyalign.models import LoraSettings, attach_lora, load_model, load_tokenizer
    from polyalign.models.loading import model_dtype

    tok = load_tokenizer(model_spec)
    base = load_model(model_spec)
    adapted = attach_lora(load_model(model_spec), LoraSettings(r=16, alpha=32))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-4)
    reqs = benchmark_prompts(n_prompts)
    times: dict[str, list[float]] = {"base": [], "adapter": []}
    for _ in range(reps):
        for name, m in (("base", base), ("adapter", adapted)):
            times[name].append(generation_tokens_per_second(m, tok, reqs, max_new_tokens, name))
    return {k: statistics.median(v) for k, v in times.items()} | {"dtype": model_dtype(base)}


def main() -> None:
    from polyalign.models.loading import default_dtype

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    fast = default_dtype() == "bfloat16"
    print(f"# dtype policy on this machine: {default_dtype()} (native bf16: {fast})")
    peaks = machine_peaks(fast)
    print("# matmul peak: " + ", ".join(f"{d} {v / 1e9:.1f} GFLOP/s" for d, v in peaks.items())
          + ("" if fast else " (bf16 at 512^3: emulated)"))
    n, tokens = (128, 32) if fast else (4, 4)     # 4 batches: a run packs its weights once for all of them
    gen = bench_eval_dtype(args.model, n, tokens)
    print(f"# eval generation ({gen['n_prompts']} prompts, {tokens} new tokens): fp32 {gen['float32']:.1f} tok/s, "
          f"bf16 {gen['bfloat16']:.1f} tok/s")
    print(f"ratio eval_generation_bf16_vs_fp32 {gen['bfloat16'] / gen['float32']:.3f}")
    batch, new = (2, 32) if fast else (1, 4)
    msd = bench_msd_step_dtype(args.model, batch, new)
    print(f"# on-policy MSD step (batch {batch}, {new} sampled tokens): fp32 {msd['float32']:.2f} s, "
          f"bf16 {msd['bfloat16']:.2f} s")
    print(f"ratio msd_step_bf16_vs_fp32 {msd['float32'] / msd['bfloat16']:.3f}")
    ad = bench_adapter_vs_base(args.model, 16 if args.quick else 32, 32)
    print(f"# eval in {ad['dtype']}: base {ad['base']:.1f} tok/s, with LoRA adapter {ad['adapter']:.1f} tok/s")
    print(f"ratio eval_adapter_vs_base {ad['base'] / ad['adapter']:.3f}")
    print(f"peak float32 {peaks['float32']:.4g} bfloat16 {peaks['bfloat16']:.4g}")


if __name__ == "__main__":
    main()
