"""Run a few training steps of a method and dump the logged losses (used by test_distributed.py).

    python tests/dist_worker.py METHOD PER_DEVICE_BATCH OUT_JSON SHARED_DIR
    accelerate launch --multi_gpu --num_processes 2 tests/dist_worker.py ...   # CPU: 2 gloo processes
"""

import json
import sys

from polyalign.train.recipes import DataSettings, Recipe, run_recipe

method, per_device, out, shared = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
common = {"model": "builtin:tiny-random", "output_dir": out + ".run", "lora": {"r": 4, "alpha": 8},
          "training": {"max_steps": 2, "learning_rate": 1e-2, "per_device_train_batch_size": per_device,
                       "save_steps": 100, "disable_tqdm": True}}
if method == "msd":
    # temperature 0 = greedy: every process draws what one process would
    r = Recipe(method="msd", data=DataSettings(source="builtin:harmful", limit=4),
               msd={"student_languages": ["th"], "max_new_tokens": 6, "temperature": 0, "mode": "off_policy"},
               **common)
else:
    r = Recipe(method="mlc", data=DataSettings(source=f"{shared}/mlc_pku/pku_saferlhf_multilingual_dpo.jsonl",
                                               split="all", limit=4),
               mlc={"paradigm": "dpo", "languages": ["en", "zh"], "dim": 16, "max_length": 384, "every": 1}, **common)
final = run_recipe(r)
from accelerate import PartialState  # noqa: E402

if PartialState().is_main_process:
    hist = json.loads((final / "log_history.json").read_text())
    json.dump([h["loss"] for h in hist if "loss" in h], open(out, "w"))

# Leave the process group explicitly (see tests/scale_worker.py): gloo threads alive at exit can abort a rank.
import torch.distributed as dist  # noqa: E402

if dist.is_available() and dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
