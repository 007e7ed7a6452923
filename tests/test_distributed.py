"""MSD and MLC under `accelerate launch` with 2 CPU processes equal one process on the same global batch.

accelerate 1.15's `--cpu` flag always takes its single-process launcher; `--multi_gpu` goes through
torchrun, which on a machine without GPUs starts real gloo processes (TrainingArguments.use_cpu).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("dist_worker.py")


def _run(cmd, tmp_path, check=True):
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]
# FSDP1 FULL_SHARD, one unit per decoder layer; use_orig_params lets LoRA's trainable weights sit
# next to frozen ones in one unit; a full state dict so that the final save is one ordinary folder.
FSDP = ["--use_fsdp", "--fsdp_version", "1", "--fsdp_sharding_strategy", "FULL_SHARD",
        "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap", "Qwen2DecoderLayer",
        "--fsdp_use_orig_params", "true", "--fsdp_state_dict_type", "FULL_STATE_DICT",
        "--fsdp_sync_module_states", "true", "--fsdp_cpu_ram_efficient_loading", "false"]


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["msd", "mlc"])
def test_two_processes_match_one(method, tmp_path, shared):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    _run([sys.executable, str(WORKER), method, "4", str(one), str(shared)], tmp_path)
    _run([*LAUNCH, "--multi_gpu", str(WORKER), method, "2", str(two), str(shared)], tmp_path)
    single, multi = json.loads(one.read_text()), json.loads(two.read_text())
    assert len(single) == len(multi) == 2
    assert multi == pytest.approx(single, rel=1e-4)
    assert (tmp_path / "two.json.run" / "final").exists()


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["msd", "mlc"])
def test_fsdp_full_shard_matches_one_process(method, tmp_path, shared):
    """FSDP FULL_SHARD over 2 CPU processes (gloo): the same losses as one process on the same
    global batch. Where this torch cannot shard on CPU the test records the error it gives (xfail,
    message in docs/scale.md) instead of passing silently."""
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    _run([sys.executable, str(WORKER), method, "4", str(one), str(shared)], tmp_path)
    res = _run([*LAUNCH, *FSDP, str(WORKER), method, "2", str(two), str(shared)], tmp_path, check=False)
    if res.returncode != 0:
        # The workers' own exception, not the launcher's ChildFailedError that wraps it.
        errors = [line.split("]: ", 1)[-1] for line in res.stderr.splitlines()
                  if "Error: " in line and "ChildFailedError" not in line]
        assert errors, res.stderr[-3000:]
        # docs/scale.md records these: accelerate 1.15's FSDP plugin requires an accelerator device;
        # 1.16 gets further and stops at sync_module_states, which FSDP supports on accelerators only.
        cpu_only = ("no available devices found", "`sync_module_states=True` is not supported on cpu")
        assert any(m in errors[-1] for m in cpu_only), errors[-1]
        pytest.xfail(f"FSDP on CPU: {errors[-1]}")
    single, multi = json.loads(one.read_text()), json.loads(two.read_text())
    assert len(single) == len(multi) == 2
    assert multi == pytest.approx(single, rel=1e-4)
