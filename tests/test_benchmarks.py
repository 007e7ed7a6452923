"""The benchmark script runs end to end on builtin:tiny-random and prints every figure (no timing asserted)."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
FIGURES = ["msd_step_throughput_vs_trl", "msd_peak_memory_vs_trl", "msd_step_throughput_vs_trl_distillation",
           "msd_peak_memory_vs_trl_distillation", "train_flops_vs_machine_peak", "train_flops_vs_matmul_peak",
           "msd_peak_memory_vs_trl_long", "msd_step_memory_above_resident_vs_trl_long", "msd_step_throughput_vs_trl_long",
           "msd_step_throughput_vs_trl_long_ceiling",
           "mlc_step_time_vs_plain_dpo", "mlc_step_time_vs_plain_dpo_every_step", "batched_vs_sequential_generation",
           "eval_generation_bf16_vs_fp32", "msd_step_bf16_vs_fp32", "eval_adapter_vs_base"]


def test_benchmarks_run_on_tiny_model(shared):
    res = subprocess.run([sys.executable, str(SCRIPT), "--model", "builtin:tiny-random", "--steps", "1",
                          "--batch", "2", "--resp-len", "8", "--long-resp-len", "16", "--shared", str(shared)],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    ratios = {line.split()[1]: float(line.split()[2]) for line in res.stdout.splitlines() if line.startswith("ratio ")}
    assert list(ratios) == FIGURES
    assert all(v > 0 for v in ratios.values())


def test_long_figures_alone_with_gradient_checkpointing():
    res = subprocess.run([sys.executable, str(SCRIPT), "--model", "builtin:tiny-random", "--long-only",
                          "--long-resp-len", "8", "--gradient-checkpointing"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "gradient checkpointing on every side" in res.stdout
    ratios = [line.split()[1] for line in res.stdout.splitlines() if line.startswith("ratio ")]
    assert ratios == ["msd_peak_memory_vs_trl_long", "msd_step_memory_above_resident_vs_trl_long",
                      "msd_step_throughput_vs_trl_long", "msd_step_throughput_vs_trl_long_ceiling"]


def test_memory_phases_name_every_phase_of_both_steps():
    res = subprocess.run([sys.executable, str(SCRIPT), "--model", "builtin:tiny-random", "--memory-phases",
                          "--long-resp-len", "8"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    if "no per-phase memory" in res.stdout:          # not Linux
        return
    phases = [line.split(":")[0].strip("# ") for line in res.stdout.splitlines() if line.startswith("#   ")]
    assert phases == ["student forward (to the final hidden states)", "teacher forward (adapter off, no grad)",
                      "LM head + divergence forward", "backward", "optimizer step",
                      "compute_loss (both forwards, logits, divergence)", "backward", "optimizer step"]
    assert sum("MB resident before the step" in line for line in res.stdout.splitlines()) == 2


def test_decode_scaling_runs_on_tiny_model():
    res = subprocess.run([sys.executable, str(SCRIPT.parent / "decode_scaling.py"), "--model", "builtin:tiny-random",
                          "--batches", "1,4"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith("batch ")]
    assert [line.split(":")[0] for line in lines] == ["batch 1", "batch 4"] and "1.00x batch 1" in lines[0]


def test_decode_linears_runs_on_tiny_model():
    res = subprocess.run([sys.executable, str(SCRIPT.parent / "decode_linears.py"), "--model", "builtin:tiny-random",
                          "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ratios = [line.split()[1] for line in res.stdout.splitlines() if line.strip().startswith("ratio ")]
    if "not in this torch build" not in res.stdout:
        assert ratios == ["evaluation_mkl_vs_onednn", "msd_sampling_mkl_vs_onednn"]
        assert "rows with the same tokens both ways" in res.stdout and "products at 512 rows" in res.stdout
        assert "memory read:" in res.stdout
    res = subprocess.run([sys.executable, str(SCRIPT.parent / "decode_linears.py"), "--model", "builtin:tiny-random",
                          "--decode-profile"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    if "not in this torch build" not in res.stdout:
        assert "draw of one token" in res.stdout
        assert "decode step (multinomial draw" in res.stdout and "decode step (inverse_cdf draw" in res.stdout
    res = subprocess.run([sys.executable, str(SCRIPT.parent / "decode_linears.py"), "--model", "builtin:tiny-random",
                          "--repeats", "1", "--packing"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ratios = [line.split()[1] for line in res.stdout.splitlines() if line.strip().startswith("ratio ")]
    if "not in this torch build" not in res.stdout:
        assert ratios == ["evaluation_plain_vs_packed", "msd_sampling_plain_vs_packed"]
        assert "oneDNN packed" in res.stdout



def test_eval_batching_runs_on_tiny_model():
    res = subprocess.run([sys.executable, str(SCRIPT.parent / "eval_batching.py"), "--model", "builtin:tiny-random",
                          "--n", "12", "--batch-size", "4", "--max-new-tokens", "4"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ratio eval_batches_chars_vs_tokens" in res.stdout and "identical responses both ways" in res.stdout
    shares = [line for line in res.stdout.splitlines() if "padding share" in line]
    assert len(shares) == 2 and "whole test split" in shares[1]

def test_generation_batches_runs_on_tiny_model():
    res = subprocess.run([sys.executable, str(SCRIPT.parent / "generation_batches.py"), "--model", "builtin:tiny-random",
                          "--batches", "1,4", "--tokens", "8", "--continuous"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith("generate")]
    assert [line.split(":")[0] for line in lines] == ["generate batch 1", "generate batch 4", "generate_batch (continuous)"]
    assert "8 prompts" in lines[0] and "32 prompts" in lines[1]


def test_trl_sdft_baseline_computes_the_msd_loss():
    """The TRL side of the headline MSD figure does the same work as ours: on the same batch, at LoRA
    init (student = base), TRL's SDFTTrainer loss equals polyalign's reverse-KL MSD loss."""
    import importlib.util

    import torch

    from polyalign.losses.msd import msd_loss
    from polyalign.models import LoraSettings, attach_lora, load_model, load_tokenizer
    from polyalign.models.batching import response_batch, response_logits

    spec = importlib.util.spec_from_file_location("bench_run", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tok = load_tokenizer("builtin:tiny-random")
    student_p, teacher_p, responses = bench.fixed_batch(tok, 3, 6)
    policy, sdft, inputs = bench.trl_sdft_side("builtin:tiny-random", tok, student_p, teacher_p, responses, 3,
                                               "cpu", "float32")
    trl_loss = sdft.compute_loss(policy, inputs)

    ours = attach_lora(load_model("builtin:tiny-random"), LoraSettings(r=16, alpha=32))
    s = response_batch(student_p, responses, tok.pad_token_id)
    t = response_batch(teacher_p, responses, tok.pad_token_id)
    with torch.no_grad():
        with ours.disable_adapter():
            teacher_logits = response_logits(ours, t)
        our_loss = msd_loss(response_logits(ours, s), teacher_logits, s["response_mask"], dpsw=False)
    assert our_loss.item() > 1e-4
    assert torch.allclose(trl_loss.detach(), our_loss, rtol=1e-4, atol=1e-6), (trl_loss.item(), our_loss.item())


def test_divergence_benchmark_runs():
    res = subprocess.run([sys.executable, str(SCRIPT.parent / "divergence.py"), "--shape", "2,4,1000", "--reps", "1"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert float(res.stdout.split("ratio divergence_time_vs_trl_sdft ")[1]) > 0


@pytest.mark.parametrize("chunk", [[], ["--chunk", "3"]])      # 16 rows in ragged chunks of 3
def test_fused_divergence_runs_and_both_sides_agree(chunk):
    res = subprocess.run([sys.executable, str(SCRIPT.parent / "fused_divergence.py"), "--shape", "2,8", "--hidden", "16",
                          "--vocab", "1000", "--reps", "1", *chunk], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ratios = [line.split()[1] for line in res.stdout.splitlines() if line.startswith("ratio ")]
    assert ratios == ["fused_vs_unfused_time", "fused_vs_unfused_peak_memory"]
    losses = next(line for line in res.stdout.splitlines() if line.startswith("# loss")).split()
    # "# loss fused X unfused Y;": the two reduce over the vocabulary in different orders (chunked vs whole), so they agree to
    # fp32 rounding, not digit for digit (AVX2, AVX-512 and AMX kernels round differently).
    fused, unfused = float(losses[3]), float(losses[5].rstrip(";"))
    assert math.isclose(fused, unfused, rel_tol=1e-4, abs_tol=1e-6), (fused, unfused)


def test_fused_divergence_against_a_baseline_tree():
    """--baseline-tree times the fused side with another checkout's polyalign on the same inputs; given
    this checkout itself, it computes the very same loss and gradient."""
    root = SCRIPT.parents[1]
    res = subprocess.run([sys.executable, str(SCRIPT.parent / "fused_divergence.py"), "--shape", "2,8", "--hidden", "16",
                          "--vocab", "1000", "--reps", "1", "--dtype", "bfloat16", "--baseline-tree", str(root)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ratios = [line.split()[1] for line in res.stdout.splitlines() if line.startswith("ratio ")]
    assert ratios == ["fused_vs_unfused_time", "fused_vs_unfused_peak_memory", "fused_baseline_tree_vs_fused_time"]
    fused = next(line for line in res.stdout.splitlines() if line.startswith("# loss")).split()
    base = next(line for line in res.stdout.splitlines() if line.startswith("# baseline tree")).split()
    assert "bfloat16" in res.stdout
    same = [math.isclose(float(a), float(b), rel_tol=1e-6) for a, b in ((base[-3], fused[3]), (base[-1], fused[8]))]
    assert all(same), (base, fused)                              # loss and |grad|


def test_bf16_quality_guard_runs_on_tiny_model(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT.parent / "bf16_quality.py"), "--model", "builtin:tiny-random",
                          "--languages", "en,th", "--limit", "2", "--max-new-tokens", "4", "--out", str(tmp_path),
                          "--force"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line.split() for line in res.stdout.splitlines() if line.startswith("verdict_agreement")]
    assert [x[1] for x in lines] == ["en", "th", "all"] and all(0 <= float(x[2]) <= 1 for x in lines)
    assert lines[-1][3] == "(8/8)" or lines[-1][3].endswith("/8)")


def test_head_input_benchmark_runs_on_tiny_model():
    res = subprocess.run([sys.executable, str(SCRIPT.parent / "head_input.py"), "--model", "builtin:tiny-random",
                          "--batch", "2", "--prompt-len", "4", "--new-tokens", "2", "--reps", "1"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ratio frozen_generate_without_vs_with_contiguous_head_input" in res.stdout


def test_allocator_benchmark_runs_both_sides_on_tiny_model():
    res = subprocess.run([sys.executable, str(SCRIPT.parent / "allocator.py"), "--model", "builtin:tiny-random",
                          "--eval-limit", "1", "--steps", "1"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "# as it comes (round 1): kept=False" in res.stdout and "kept=True" in res.stdout
    assert "ratio cpu_malloc_eval_speedup" in res.stdout and "ratio cpu_malloc_msd_step_speedup" in res.stdout
    assert "same generations on both sides: True; same losses: True" in res.stdout


def test_decode_linears_lora_beside_runs_on_tiny_model():
    res = subprocess.run([sys.executable, str(SCRIPT.parent / "decode_linears.py"), "--model", "builtin:tiny-random",
                          "--lora-beside", "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ratio msd_sampling_folded_vs_beside" in res.stdout and "rows with the same tokens both ways" in res.stdout


def test_decode_linears_pack_folded_runs_on_tiny_model():
    res = subprocess.run([sys.executable, str(SCRIPT.parent / "decode_linears.py"), "--model", "builtin:tiny-random",
                          "--pack-folded", "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ratio msd_sampling_folded_plain_vs_packed" in res.stdout and "rows with the same tokens both ways" in res.stdout


def test_eval_batch_size_runs_on_tiny_model():
    """Two batch sizes on the tiny model: a row per size, the reference agreeing with itself."""
    res = subprocess.run([sys.executable, str(SCRIPT.parent / "eval_batch_size.py"), "--model", "builtin:tiny-random",
                          "--sizes", "4,16", "--limit", "2", "--repeats", "1", "--max-new-tokens", "4"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| 4 |") or line.startswith("| 16 |")]
    assert len(rows) == 2 and "| 1.000 | 36/36 | 36/36 |" in rows[0]


def test_eval_batch_size_profiles_a_decode_step_on_tiny_model():
    res = subprocess.run([sys.executable, str(SCRIPT.parent / "eval_batch_size.py"), "--model", "builtin:tiny-random",
                          "--profile", "8", "--limit", "2", "--max-new-tokens", "4"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "# decode step at 8 rows" in res.stdout and " ms  " in res.stdout


def test_fold_merge_runs_both_sides_on_tiny_model():
    """Each piece of work timed both ways, with the same results (the benchmark checks bit for bit)."""
    res = subprocess.run([sys.executable, str(SCRIPT.parent / "fold_merge.py"), "--model", "builtin:tiny-random",
                          "--repeats", "1", "--tokens", "4"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| ") and "speedup" in line]
    assert len(rows) == 3 and all(line.endswith("| yes |") for line in rows), res.stdout
