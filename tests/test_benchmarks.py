"""The benchmark script runs end to end on builtin:tiny-random and prints every figure (no timing asserted)."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
FIGURES = ["msd_step_throughput_vs_trl", "msd_peak_memory_vs_trl", "train_flops_vs_matmul_peak",
           "mlc_step_time_vs_plain_dpo", "mlc_step_time_vs_plain_dpo_every_step", "batched_vs_sequential_generation"]


def test_benchmarks_run_on_tiny_model(shared):
    res = subprocess.run([sys.executable, str(SCRIPT), "--model", "builtin:tiny-random", "--steps", "1",
                          "--batch", "2", "--resp-len", "8", "--shared", str(shared)],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    ratios = {line.split()[1]: float(line.split()[2]) for line in res.stdout.splitlines() if line.startswith("ratio ")}
    assert list(ratios) == FIGURES
    assert all(v > 0 for v in ratios.values())


def test_decode_scaling_runs_on_tiny_model():
    res = subprocess.run([sys.executable, str(SCRIPT.parent / "decode_scaling.py"), "--model", "builtin:tiny-random",
                          "--batches", "1,4"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith("batch ")]
    assert [line.split(":")[0] for line in lines] == ["batch 1", "batch 4"] and "1.00x batch 1" in lines[0]


def test_generation_batches_runs_on_tiny_model():
    res = subprocess.run([sys.executable, str(SCRIPT.parent / "generation_batches.py"), "--model", "builtin:tiny-random",
                          "--batches", "1,4", "--tokens", "8", "--continuous"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith("generate")]
    assert [line.split(":")[0] for line in lines] == ["generate batch 1", "generate batch 4", "generate_batch (continuous)"]
    assert "8 prompts" in lines[0] and "32 prompts" in lines[1]
