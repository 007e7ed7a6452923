"""scripts/gpu_check.sh on a machine without CUDA stops before the first GPU step and says why;
its summary table and verdict agreement are computed from the stages' results."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only stop")
def test_stops_before_the_first_gpu_step_on_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    res = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 3, res.stdout[-2000:] + res.stderr[-2000:]
    assert "stopped before the first GPU step: torch.cuda.is_available() is False" in res.stdout
    assert not list(tmp_path.glob("*.json"))                 # no stage ran


def test_verdict_agreement_and_summary_table():
    g = _script()
    a = {"en/1": "safe", "en/2": "unsafe", "zh/1": "invalid", "zh/2": "safe"}
    b = {"en/1": "safe", "en/2": "safe", "zh/1": "invalid", "zh/3": "safe"}
    assert g.agreement(a, b) == "0.667 (2/3)"                  # zh/2 and zh/3 are not in both
    assert g.agreement(a, {}) == "n/a"
    res = {"train_hf": {"step_s_mean": 2.5, "sampled_tokens_per_s_after_warmup": 400.0, "peak_gib": 9.1},
           "train_vllm": {"error": "PolyalignError: msd.use_vllm needs vLLM"},
           "train_fsdp_full": {"wall_s": 41.0, "fused": True},
           "head_memory": {"ours": {"seconds": 0.5, "tokens_per_second": 9000, "peak_mb": 4096.0},
                           "ours_unfused": {"seconds": 0.6, "tokens_per_second": 8000, "peak_mb": 8192.0},
                           "trl_sdft": {"seconds": 1.0, "tokens_per_second": 5000, "peak_mb": 16384.0}},
           "eval_hf": {"wall_s": 30.0, "peak_gib": 4.0, "verdicts": a},
           "eval_vllm": {"wall_s": 10.0, "peak_gib": 60.0, "verdicts": b}}
    text = g.summary({"gpu": "test"}, res, shape_only=True)
    assert "| MSD step, HF sampling | 2.5 | 400.0 | 9.1 |" in text
    assert "| MSD step, vLLM colocate | error: PolyalignError: msd.use_vllm needs vLLM" in text
    assert "| MSD full fine-tuning, FSDP2, 2 steps (run) | 41.0 | fused: True | - |" in text
    assert "fused vs full-logits peak memory: 0.500" in text
    assert "msd_peak_memory_vs_trl_long (GPU): 0.250" in text
    assert "msd_step_throughput_vs_trl_long (GPU, separate processes): 2.000" in text
    assert "hf vs vllm verdict agreement: 0.667 (2/3)" in text and "RANDOM" in text


def test_hub_kernels_stay_off_unless_asked(monkeypatch, tmp_path):
    """transformers 5.2x fetches `kernels` from the hub by default on CUDA; offline, every load failed
    on an H200 (2026-12-04). load_model asks for none unless POLYALIGN_HUB_KERNELS=1."""
    from transformers import AutoModelForCausalLM

    from polyalign.models.builtin import build_tiny_model
    from polyalign.models.loading import load_model

    calls, model = [], build_tiny_model()
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda location, **kw: calls.append(kw) or model)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    monkeypatch.delenv("POLYALIGN_HUB_KERNELS", raising=False)
    load_model(str(folder), dtype="float32", device="cpu")
    monkeypatch.setenv("POLYALIGN_HUB_KERNELS", "1")
    load_model(str(folder), dtype="float32", device="cpu")
    assert [c["use_kernels"] for c in calls] == [False, True]


def test_a_real_folder_loads_with_hub_kernels_off(tmp_path):
    """The keyword reaches a real from_pretrained (a transformers without it would refuse it)."""
    from polyalign.models.builtin import build_tiny_model
    from polyalign.models.loading import load_model

    build_tiny_model().save_pretrained(tmp_path / "tiny")
    model = load_model(str(tmp_path / "tiny"), dtype="float32", device="cpu")
    assert not model.use_kernels and model.config.hidden_size > 0


def test_memory_plan_counts_from_the_model_size():
    spec = importlib.util.spec_from_file_location("memory_per_gpu", ROOT / "scripts" / "memory_per_gpu.py")
    mem = importlib.util.module_from_spec(spec)
    sys.modules["memory_per_gpu"] = mem               # dataclasses look their module up there
    spec.loader.exec_module(mem)
    m = mem.Model(params=1e9, layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, vocab=100)
    # per layer, r=2: q 8x8, k 8x4, v 8x4, o 8x8, gate 8x16, up 8x16, down 16x8 -> r * (in + out) each
    assert mem.lora_params(m, 2) == 2 * 2 * ((8 + 8) + (8 + 4) * 2 + (8 + 8) + (8 + 16) * 3)
    rows = mem.plan(m, gpus=4, lora_r=2, batch=1, response=10)
    assert rows["ZeRO-3, full"]["weights+optimizer"] == rows["DDP, full"]["weights+optimizer"] / 4 == 4.0
    assert rows["DDP, LoRA"]["teacher"] == 0 and rows["DDP, full"]["teacher"] == 2.0
    assert abs(rows["DDP, LoRA"]["logits, unfused"] - 10 * 100 * 12 / 1e9) < 1e-15
