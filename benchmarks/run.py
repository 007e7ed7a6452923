"""polyalign benchmarks: each figure is a ratio against a baseline measured side by side in this run.

    python benchmarks/run.py --quick            # ~minutes on 2 CPU cores (0.5B model, small batch)
    python benchmarks/run.py                    # full: builtin:qwen2.5-coder-0.5b-instruct, batch 4
    python benchmarks/run.py --model builtin:tiny-random --steps 1   # smoke (what the tests run)
    python benchmarks/run.py --long-only [--gradient-checkpointing]  # response 512, batch 4 only
    python benchmarks/run.py --memory-phases                         # where that long step's memory goes

Prints one line per figure: ``ratio NAME VALUE`` (plus the raw numbers behind it).

Baselines:
* MSD step vs TRL (headline): TRL's own self-distillation trainer, ``trl.experimental.sdft.SDFTTrainer``,
  configured as MSD -- LoRA student, teacher = the student with its adapter disabled
  (``teacher_model_kind="base"``) shown its own context, full-vocab reverse KL on the response
  (``distillation_mode="full_logits"``, ``distillation_alpha=1.0``); its ``compute_loss`` on the fixed batch.
* MSD step vs TRL's stable distillation trainer (``..._distillation``): the same work done the way
  TRL 1.16's ``DistillationTrainer`` does it: a separate teacher model and TRL's fused
  ``_chunked_divergence_loss`` (beta=1.0 = reverse KL) over hidden states.
* Ours: the teacher is the same network with the adapter disabled, and polyalign's chunked
  divergence over the response logits only. Responses are fixed (generation is excluded from every
  side) so only the step differs. Peak memory: each side in its own process. Step time: all sides
  in one process with their steps alternating, so a shared machine's drifting speed hits all alike.
* MLC: TRL's DPOTrainer.training_step with the MLC term vs without it, same batch; headline on the
  official schedule (MLC term every 2nd step), plus the every-step cost.
* Generation: evaluation's own path (``generate_cached``: length-sorted batches at ``HFGenerator``'s
  default batch size) vs the same path one prompt at a time; 32 benign prompts in en zh th sw, greedy
  (--quick: 32 new tokens, the sequential side on every 4th prompt; full: 64 tokens, all prompts).
* FLOP/s: the MSD step's model FLOPs (non-embedding N: 2 N per token forward, 2 N per student token
  backward through frozen weights; LM head on the response window) over its time, divided by the
  best of five timings of a 2048^3 matmul (fp32 on CPU, bf16 on GPU) in this run.
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

ROOT = Path(__file__).resolve().parents[1]


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KB


def fixed_batch(tok, batch: int, resp_len: int, seed: int = 0):
    """Student/teacher prompts from the built-in benchmark and fixed random responses."""
    from polyalign.data.builtin import builtin_benchmark
    from polyalign.models.chat import prompt_ids
    from polyalign.train.msd_config import TEACHER_TEMPLATE

    recs = builtin_benchmark("harmful", "train")[:batch]
    g = torch.Generator().manual_seed(seed)
    student = [prompt_ids(tok, r.texts["th"]) for r in recs]
    teacher = [prompt_ids(tok, TEACHER_TEMPLATE.format(target_query=r.texts["th"], english_query=r.texts["en"]))
               for r in recs]
    responses = [torch.randint(100, min(len(tok), 20000), (resp_len,), generator=g).tolist() for _ in recs]
    return student, teacher, responses


CHECKPOINTING = False     # --gradient-checkpointing: every side recomputes its layers in the backward
ONE_PASS_LORA = True      # --peft-lora-forward: our side on PEFT's LoRA forward (before commit 7a2316b)
PHASES: list[tuple[str, float, float]] | None = None   # --memory-phases: (phase, its peak, resident after it)


def mark(phase: str) -> None:
    """With ``--memory-phases``: record the peak resident memory since the previous mark and what is
    resident now, then count the peak afresh, so each phase of the step gets its own peak."""
    if PHASES is None:
        return
    peak = peak_since_reset_mb()
    PHASES.append((phase, peak, resident_mb()))


def msd_side(kind: str, model_spec: str, batch: int, resp_len: int):
    """One side of the MSD comparison: (step function, model FLOPs per step, tokens per step)."""
    from polyalign.models import LoraSettings, attach_lora, load_model, load_tokenizer
    from polyalign.models.batching import response_batch
    from polyalign.models.loading import default_dtype

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = default_dtype()                 # the policy's dtype, the same on every side
    tok = load_tokenizer(model_spec)
    student_p, teacher_p, responses = fixed_batch(tok, batch, resp_len)
    s = {k: v.to(device) for k, v in response_batch(student_p, responses, tok.pad_token_id).items()}
    t = {k: v.to(device) for k, v in response_batch(teacher_p, responses, tok.pad_token_id).items()}
    if kind == "trl_sdft":   # TRL builds its own LoRA student
        policy, sdft, sdft_inputs = trl_sdft_side(model_spec, tok, student_p, teacher_p, responses, batch, device, dtype)
    else:
        policy = attach_lora(load_model(model_spec, dtype=dtype, device=device), LoraSettings(r=16, alpha=32))
    if kind in ("ours", "ours_unfused") and ONE_PASS_LORA:   # as MSDTrainer.training_step: LoRA's sum in one pass
        from polyalign.models import lora_add

        lora_add.install(policy)
    policy.train()
    if CHECKPOINTING:   # the same on every side (TRL's trainer would only turn it on in train())
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
    if kind == "trl":
        teacher = load_model(model_spec, dtype=dtype, device=device)   # TRL needs a separate teacher model
        teacher.requires_grad_(False)
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

    def step() -> None:
        from polyalign.losses.msd import fused_token_divergence, mean_over_valid, msd_loss, reduce_sequences
        from polyalign.models.batching import response_hidden, response_logits

        if kind in ("ours", "body"):   # both forwards to the final hidden states (the teacher: adapter off)
            head = policy.get_output_embeddings()
            h_s = response_hidden(policy, s, head)
            mark("student forward (to the final hidden states)")
            with torch.no_grad(), policy.disable_adapter():
                h_t = response_hidden(policy, t, head)
            mark("teacher forward (adapter off, no grad)")
        if kind == "ours":      # the trainer's default: fused LM head + divergence, no [B, R, V] logits
            d, _ = fused_token_divergence(h_s, h_t, head.weight, head.bias)
            per_seq, valid = reduce_sequences(d, s["response_mask"].to(d.dtype), s["response_mask"])
            loss = mean_over_valid(per_seq, valid, h_s)
            mark("LM head + divergence forward")
        elif kind == "ours_unfused":
            student_logits = response_logits(policy, s)
            with torch.no_grad(), policy.disable_adapter():
                teacher_logits = response_logits(policy, t)
            loss = msd_loss(student_logits, teacher_logits, s["response_mask"], dpsw=False)
        elif kind == "trl_sdft":
            loss = sdft.compute_loss(policy, sdft_inputs)
        elif kind == "body":    # what every side computes: both forwards and the backward, no LM head
            loss = (h_s.float() * h_t.float()).mean()
        else:
            R = s["response_mask"].shape[1]
            hs = policy(input_ids=s["input_ids"], attention_mask=s["attention_mask"], position_ids=s["position_ids"],
                        output_hidden_states=True, logits_to_keep=1).hidden_states[-1][:, -R - 1:-1]
            with torch.no_grad():
                ht = teacher(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                             position_ids=t["position_ids"], output_hidden_states=True,
                             logits_to_keep=1).hidden_states[-1][:, -R - 1:-1]
            w_s = policy.get_output_embeddings().weight
            loss = _chunked_divergence_loss(hs, ht, w_s, teacher.get_output_embeddings().weight,
                                            s["response_mask"].long(), beta=1.0)[0]
        if kind == "trl_sdft":
            mark("compute_loss (both forwards, logits, divergence)")
        loss.backward()
        mark("backward")
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark("optimizer step")
        if device == "cuda":
            torch.cuda.synchronize()

    n_tokens = int(s["attention_mask"].sum() + t["attention_mask"].sum())
    # Model FLOPs as in MFU accounting: N = non-embedding weights (the embedding is a lookup), 2N per
    # token forward (student + teacher), 2N per student token backward (input gradients through the
    # frozen weights; LoRA's own gradients are negligible); the LM head (V x H) runs on the response
    # window only, forward for both and backward for the student. Attention scores are left out.
    emb = policy.get_input_embeddings().weight
    n_params = sum(p.numel() for n, p in policy.named_parameters() if "lora_" not in n and p is not emb)
    if policy.get_output_embeddings().weight is not emb:       # untied head: counted below instead
        n_params -= policy.get_output_embeddings().weight.numel()
    head = emb.shape[0] * emb.shape[1]
    n_resp = int(s["response_mask"].sum())
    flops = 2 * n_params * (n_tokens + int(s["attention_mask"].sum())) + 3 * 2 * head * n_resp
    return step, flops, n_tokens


def resident_mb() -> float | None:
    """This process's resident memory now (Linux), and from now on its peak is counted afresh
    (``clear_refs`` 5 resets VmHWM), so :func:`peak_since_reset_mb` is a step's own peak; None where unknown."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_since_reset_mb() -> float | None:
    """The peak resident memory since :func:`resident_mb` (VmHWM; CUDA: max allocated)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) / 1024


def worker_msd(kind: str, model_spec: str, batch: int, resp_len: int, steps: int, profile: bool = False) -> dict:
    """One side of the MSD comparison in its own process, so its peak memory is its own. With
    ``steps=0``: the peak, the peak while loading, and what was resident when the step began."""
    step, flops, n_tokens = msd_side(kind, model_spec, batch, resp_len)
    loaded = {"load_peak_mb": peak_memory_mb(), "before_step_mb": resident_mb()}
    step()  # warm-up; with steps=0 this one step is all (the caller wants peak memory only)
    if not steps:
        return {"peak_mb": peak_memory_mb(), "step_peak_mb": peak_since_reset_mb(), **loaded}
    if PHASES is not None:   # a second step, phase by phase (the first allocated the optimizer's state)
        resident = resident_mb()
        PHASES[:] = [("before the step", resident, resident)]
        step()
        return {"phases": PHASES}
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as tprofile

        cuda = torch.cuda.is_available()
        with tprofile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            step()
        print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=15),
              file=sys.stderr)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    return {"seconds": sec, "tokens_per_second": n_tokens / sec, "peak_mb": peak_memory_mb(), "flops": flops}


def worker_interleaved(kinds: list[str], model_spec: str, batch: int, resp_len: int, steps: int) -> dict:
    """Step times of several sides in one process, their steps alternating (A B C A B C ...), so a
    shared VM's drifting speed hits every side alike. Median seconds per side."""
    sides = {k: msd_side(k, model_spec, batch, resp_len) for k in kinds}
    for step, _, _ in sides.values():
        step()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(steps):
        for k, (step, _, _) in sides.items():
            t0 = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t0)
    return {k: {"seconds": statistics.median(v), "tokens_per_second": sides[k][2] / statistics.median(v),
                "flops": sides[k][1]} for k, v in times.items()}


def trl_sdft_side(model_spec: str, tok, student_p, teacher_p, responses, batch: int, device: str, dtype: str):
    """TRL's own self-distillation trainer (``trl.experimental.sdft.SDFTTrainer``) set up as MSD:
    the teacher is the student with its LoRA adapter disabled (``teacher_model_kind="base"``), it sees
    its own context (the teacher template) before the same response, and the loss is the full-vocab
    reverse KL (``distillation_mode="full_logits"``, ``distillation_alpha=1.0``). We call its
    ``compute_loss`` on a fixed batch, so generation is excluded as on our side."""
    import tempfile

    from datasets import Dataset
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from polyalign.models import LoraSettings, load_model, lora_config
    from polyalign.models.batching import left_pad

    cfg = SDFTConfig(output_dir=tempfile.mkdtemp(prefix="polyalign-bench-sdft-"), per_device_train_batch_size=batch,
                     num_generations=1, teacher_model_kind="base", distillation_mode="full_logits",
                     distillation_alpha=1.0, distillation_is_clip=None, gradient_checkpointing=False,
                     bf16=dtype == "bfloat16", use_cpu=device == "cpu", report_to=[], seed=0)
    data = Dataset.from_list([{"prompt": "x", "privileged_context": "y"}] * batch)   # unused: we pass the batch
    trainer = SDFTTrainer(model=load_model(model_spec, dtype=dtype, device=device), args=cfg, train_dataset=data,
                          processing_class=tok, peft_config=lora_config(LoraSettings(r=16, alpha=32)))
    trainer.current_gradient_accumulation_steps = 1    # set by the train loop; we call compute_loss directly
    policy = trainer.model
    policy.train()
    completion = torch.tensor(responses)
    p_ids, p_mask, _ = left_pad(student_p, tok.pad_token_id)
    t_ids, t_mask, _ = left_pad(teacher_p, tok.pad_token_id)
    ones = torch.ones_like(completion)
    inputs = {"prompt_ids": p_ids, "prompt_mask": p_mask, "completion_ids": completion, "completion_mask": ones,
              "teacher_input_ids": torch.cat([t_ids, completion], 1),
              "teacher_attention_mask": torch.cat([t_mask, ones], 1)}
    return policy, trainer, {k: v.to(device) for k, v in inputs.items()}


MSD_SIDES = ["ours", "trl_sdft", "trl"]


def run_worker(kind: str, args, steps: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--model", args.model, "--batch", str(args.batch),
           "--resp-len", str(args.resp_len), "--steps", str(args.steps if steps is None else steps)]
    cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    cmd += ["--peft-lora-forward"] if args.peft_lora_forward else []
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"worker {kind} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_mlc(model_spec: str, shared: Path, steps: int) -> dict:
    """Plain DPO vs DPO+MLC: TRL's training_step on the same batch.

    ``mlc_every1`` adds the MLC term on every step (the cost of one MLC step); ``mlc`` follows the
    official schedule (``every`` = 2: the term on even optimizer steps), timed over as many even
    as odd steps, which is the step time a user of the default recipe sees.
    """
    from polyalign.train.mlc_trainer import build_mlc_trainer
    from polyalign.train.recipes import DataSettings, Recipe, build_model, load_prompts, training_arguments

    out = {}
    for name, weight, every in (("plain", 0.0, 1), ("mlc_every1", 0.8, 1), ("mlc", 0.8, 2)):
        r = Recipe(method="mlc", model=model_spec, output_dir=f"/tmp/polyalign-bench-{name}",
                   data=DataSettings(source=str(shared / "mlc_pku/pku_saferlhf_multilingual_dpo.jsonl"), split="all",
                                     limit=2),
                   mlc={"paradigm": "dpo", "weight": weight, "every": every, "max_length": 256,
                        "languages": ["en", "zh", "ar", "sw"]},
                   lora={"r": 16, "alpha": 32}, training={"per_device_train_batch_size": 2, "max_steps": 2 * steps})
        torch.manual_seed(0)
        model, tok = build_model(r)
        trainer = build_mlc_trainer(r, model, tok, load_prompts(r.data.source, None, "all", 2), training_arguments(r))
        trainer.create_optimizer_and_scheduler(num_training_steps=2 * steps + 1)
        trainer.current_gradient_accumulation_steps = 1   # set by the train loop; we call training_step directly
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
        trainer.model.train()
        times = []
        for i in range(2 * steps + 1):
            trainer.state.global_step = i                   # drives the every-k schedule
            t0 = time.perf_counter()
            trainer.training_step(trainer.model, dict(batch))
            if i:                                           # step 0 warms up
                times.append(time.perf_counter() - t0)
        out[name] = statistics.mean(times)
    return out


def bench_generation(model_spec: str, n_prompts: int, max_new_tokens: int, sequential_every: int = 1) -> dict:
    """Evaluation's generation path (length-sorted batches, on-disk cache) at its default batch size
    vs the same path one prompt at a time, greedy. Throughput is tokens/s, so the sequential side may
    run on every k-th prompt (the prompt list is language-major, so each language keeps its share)."""
    import inspect
    import tempfile

    from precision import benchmark_prompts

    from polyalign.eval.generation import GenerationCache, GenerationSettings, HFGenerator, generate_cached
    from polyalign.models import load_model, load_tokenizer

    tok, model = load_tokenizer(model_spec), load_model(model_spec)
    default_bs = inspect.signature(HFGenerator).parameters["batch_size"].default
    reqs = benchmark_prompts(n_prompts)
    s = GenerationSettings(max_new_tokens=max_new_tokens)
    res = {"batch_size": default_bs, "n_prompts": len(reqs), "n_sequential": len(reqs[::sequential_every])}
    for name, bs, subset in (("sequential", 1, reqs[::sequential_every]), ("batched", default_bs, reqs)):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            rows, _, _ = generate_cached(HFGenerator(model, tok, batch_size=bs), subset, s,
                                         GenerationCache(Path(tmp) / "generations.jsonl"), fingerprint=name)
            sec = time.perf_counter() - t0
        res[name] = sum(len(tok(r["response"], add_special_tokens=False)["input_ids"]) for r in rows.values()) / sec
    return res


def long_figures(args: argparse.Namespace) -> None:
    """The long-response figures (batch 4, ``--long-resp-len``): peak memory of each side in its own
    process, step time with the sides alternating in one, and the shared body that bounds the ratio."""
    long_args = argparse.Namespace(**{**vars(args), "batch": 4, "resp_len": args.long_resp_len,
                                      "steps": 1 if args.quick else 2})
    long_runs = {k: run_worker(k, long_args, steps=0) for k in ("ours", "trl_sdft")}
    long_mem = {k: r["peak_mb"] for k, r in long_runs.items()}
    long_speed = run_worker("interleaved_long", long_args)
    gc = ", gradient checkpointing on every side" if args.gradient_checkpointing else ""
    gc += ", ours on PEFT's LoRA forward" if args.peft_lora_forward else ""
    print(f"# msd step at response {args.long_resp_len}, batch 4{gc}: ours {long_speed['ours']['tokens_per_second']:.1f} tok/s, "
          f"peak {long_mem['ours']:.0f} MB; TRL SDFTTrainer {long_speed['trl_sdft']['tokens_per_second']:.1f} tok/s, "
          f"peak {long_mem['trl_sdft']:.0f} MB")
    print(f"ratio msd_peak_memory_vs_trl_long {long_mem['ours'] / long_mem['trl_sdft']:.3f}")
    # Why the memory ratio is what it is: the peak also holds what both sides hold before the step
    # (weights, optimizer state, the loader's leftovers); the step's own share is the peak above that.
    if all(r.get("before_step_mb") is not None and r.get("step_peak_mb") for r in long_runs.values()):
        above = {k: r["step_peak_mb"] - r["before_step_mb"] for k, r in long_runs.items()}
        print("# peak memory at response " + str(args.long_resp_len) + ": " + "; ".join(
            f"{k}: {r['before_step_mb']:.0f} MB resident before the step (loading peaked at {r['load_peak_mb']:.0f}), "
            f"the step's peak {r['step_peak_mb']:.0f} (+{above[k]:.0f})" for k, r in long_runs.items()))
        print(f"ratio msd_step_memory_above_resident_vs_trl_long {above['ours'] / max(above['trl_sdft'], 1e-9):.3f}")
    print(f"ratio msd_step_throughput_vs_trl_long "
          f"{long_speed['ours']['tokens_per_second'] / long_speed['trl_sdft']['tokens_per_second']:.3f}")
    # Why the throughput ratio is what it is: both sides run the same forwards and backward through
    # the layers ("body"); they differ only in the LM head and the divergence. TRL's step over the
    # body's is the ratio ours would reach if our head and divergence cost nothing.
    body, sdft_s, ours_s = (long_speed[k]["seconds"] for k in ("body", "trl_sdft", "ours"))
    print(f"# msd step at response {args.long_resp_len}: shared body (forwards + backward, no LM head) {body:.2f} s; "
          f"beyond it: ours (head + divergence) {ours_s - body:.2f} s, TRL SDFTTrainer {sdft_s - body:.2f} s")
    print(f"ratio msd_step_throughput_vs_trl_long_ceiling {sdft_s / body:.3f}")


def memory_phases(args: argparse.Namespace) -> None:
    """Where each side's long step holds its memory: per phase, the peak above what was resident before
    the step (the second step in its process; Linux VmHWM, reset by ``clear_refs``)."""
    long_args = argparse.Namespace(**{**vars(args), "batch": 4, "resp_len": args.long_resp_len})
    gc = ", gradient checkpointing" if args.gradient_checkpointing else ""
    for kind in ("ours", "trl_sdft"):
        phases = run_worker("phases_" + kind, long_args, steps=1)["phases"]
        if phases[0][1] is None:
            print(f"# {kind}: no per-phase memory on this platform (needs Linux /proc)")
            continue
        start = phases[0][2]
        print(f"# {kind}, response {args.long_resp_len}, batch 4{gc}: {start:.0f} MB resident before the step")
        for name, peak, now in phases[1:]:
            print(f"#   {name}: peak +{peak - start:.0f} MB, then resident +{now - start:.0f} MB")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--resp-len", type=int, default=None)
    p.add_argument("--long-resp-len", type=int, default=512, help="response length of the long-response figures")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--worker", default=None)
    p.add_argument("--long-only", action="store_true", help="only the long-response figures (batch 4)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="every side recomputes its layers' activations in the backward (less memory, more time)")
    p.add_argument("--peft-lora-forward", action="store_true",
                   help="our side's LoRA layers on PEFT's own forward, not polyalign.models.lora_add's one-pass sum")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of our MSD step and exit")
    p.add_argument("--memory-phases", action="store_true",
                   help="ours and TRL's long step (batch 4, --long-resp-len): each phase's peak resident memory")
    args = p.parse_args()
    global CHECKPOINTING, PHASES, ONE_PASS_LORA   # set once from the command line, before any side is built
    CHECKPOINTING, ONE_PASS_LORA = args.gradient_checkpointing, not args.peft_lora_forward
    args.batch = args.batch or (2 if args.quick else 4)
    args.resp_len = args.resp_len or (32 if args.quick else 64)
    args.steps = (2 if args.quick else 4) if args.steps is None else args.steps
    if args.worker == "interleaved":
        print(json.dumps(worker_interleaved(MSD_SIDES, args.model, args.batch, args.resp_len, args.steps)))
        return
    if args.worker == "interleaved_long":
        print(json.dumps(worker_interleaved(["ours", "trl_sdft", "body"], args.model, args.batch, args.resp_len,
                                            args.steps)))
        return
    if args.worker and args.worker.startswith("phases_"):
        PHASES = []
        print(json.dumps(worker_msd(args.worker.removeprefix("phases_"), args.model, args.batch, args.resp_len, 1)))
        return
    if args.memory_phases:
        memory_phases(args)
        return
    if args.worker or args.profile:
        print(json.dumps(worker_msd(args.worker or "ours", args.model, args.batch, args.resp_len, args.steps,
                                    profile=args.profile)))
        return
    if args.long_only:
        long_figures(args)
        return
    device = "cuda:" + torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}"
    print(f"# model {args.model}, batch {args.batch}, response {args.resp_len} tokens, {args.steps} timed steps, {device}")
    memory = {k: run_worker(k, args, steps=0)["peak_mb"] for k in MSD_SIDES}   # one process per side
    speed = run_worker("interleaved", args)                                  # one process, steps alternating
    ours, sdft, dist = ({**speed[k], "peak_mb": memory[k]} for k in MSD_SIDES)
    print(f"# msd step: ours {ours['tokens_per_second']:.1f} tok/s, peak {ours['peak_mb']:.0f} MB; "
          f"TRL SDFTTrainer {sdft['tokens_per_second']:.1f} tok/s, peak {sdft['peak_mb']:.0f} MB; "
          f"TRL DistillationTrainer-style {dist['tokens_per_second']:.1f} tok/s, peak {dist['peak_mb']:.0f} MB")
    print(f"ratio msd_step_throughput_vs_trl {ours['tokens_per_second'] / sdft['tokens_per_second']:.3f}")
    print(f"ratio msd_peak_memory_vs_trl {ours['peak_mb'] / sdft['peak_mb']:.3f}")
    print(f"ratio msd_step_throughput_vs_trl_distillation {ours['tokens_per_second'] / dist['tokens_per_second']:.3f}")
    print(f"ratio msd_peak_memory_vs_trl_distillation {ours['peak_mb'] / dist['peak_mb']:.3f}")
    from precision import machine_peaks

    from polyalign.models.loading import default_dtype

    peaks = machine_peaks(default_dtype() == "bfloat16")
    mm, best = peaks["float32"], max(peaks.values())
    achieved = ours["flops"] / ours["seconds"]
    print(f"# msd step {achieved / 1e9:.1f} GFLOP/s in {default_dtype()}; matmul peak "
          + ", ".join(f"{d} {v / 1e9:.1f}" for d, v in peaks.items()) + " GFLOP/s")
    print(f"ratio train_flops_vs_machine_peak {achieved / best:.3g}")   # tiny models: ~0.005, 0.000 at .3f under load
    print(f"ratio train_flops_vs_matmul_peak {achieved / mm:.3g}")
    long_figures(args)
    mlc = bench_mlc(args.model, Path(args.shared), 1 if args.quick else args.steps)   # quick: 2 timed steps each
    print(f"# dpo step: plain {mlc['plain']:.2f} s; with MLC every step {mlc['mlc_every1']:.2f} s, "
          f"on the official every-2nd-step schedule {mlc['mlc']:.2f} s (mean)")
    print(f"ratio mlc_step_time_vs_plain_dpo {mlc['mlc'] / mlc['plain']:.3f}")
    print(f"ratio mlc_step_time_vs_plain_dpo_every_step {mlc['mlc_every1'] / mlc['plain']:.3f}")
    gen = bench_generation(args.model, 32, 32 if args.quick else 64, sequential_every=4 if args.quick else 1)
    print(f"# generation ({gen['n_prompts']} prompts, en zh th sw; sequential on {gen['n_sequential']}): "
          f"sequential {gen['sequential']:.1f} tok/s, batched (evaluation's default batch {gen['batch_size']}) "
          f"{gen['batched']:.1f} tok/s")
    print(f"ratio batched_vs_sequential_generation {gen['batched'] / gen['sequential']:.3f}")
    sys.stdout.flush()
    subprocess.run([sys.executable, str(Path(__file__).parent / "precision.py"), "--model", args.model]
                   + (["--quick"] if args.quick else []), check=True)


if __name__ == "__main__":
    main()
