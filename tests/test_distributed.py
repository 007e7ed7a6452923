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


def _run(cmd, tmp_path):
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["msd", "mlc"])
def test_two_processes_match_one(method, tmp_path, shared):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    _run([sys.executable, str(WORKER), method, "4", str(one), str(shared)], tmp_path)
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", str(WORKER), method, "2", str(two), str(shared)],
         tmp_path)
    single, multi = json.loads(one.read_text()), json.loads(two.read_text())
    assert len(single) == len(multi) == 2
    assert multi == pytest.approx(single, rel=1e-4)
    assert (tmp_path / "two.json.run" / "final").exists()
