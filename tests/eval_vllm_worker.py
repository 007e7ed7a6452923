"""`polyalign eval --backend vllm` with a fake vLLM that records, per rank, the prompts it was sent
(used by test_eval_scale.py under `accelerate launch`).

    python tests/eval_vllm_worker.py MODEL_FOLDER OUT TENSOR_PARALLEL
"""

import json
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace

folder, out, tp = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
rank = os.environ.get("RANK", "0")
sent: list = []


class FakeLLM:
    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def generate(self, prompts, params, lora_request=None, use_tqdm=True):
        sent.append([p["prompt_token_ids"] for p in prompts])
        return [SimpleNamespace(outputs=[SimpleNamespace(text=f"answer {sum(p['prompt_token_ids']) % 97}")])
                for p in prompts]


vllm = types.ModuleType("vllm")
vllm.LLM, vllm.SamplingParams = FakeLLM, lambda **kw: SimpleNamespace(**kw)
request = types.ModuleType("vllm.lora.request")
request.LoRARequest = lambda *a: SimpleNamespace(args=a)
sys.modules.update({"vllm": vllm, "vllm.lora": types.ModuleType("vllm.lora"), "vllm.lora.request": request})

from polyalign.eval.generation import _ENGINES  # noqa: E402
from polyalign.eval.runner import EvalConfig, run_eval  # noqa: E402

res = run_eval(EvalConfig(model=folder, backend="vllm", out=str(out), languages="en,th", limit=5, batch_size=3,
                          max_new_tokens=4, vllm_tensor_parallel=tp))
(engine,) = _ENGINES.values()
(out / f"rank{rank}.json").write_text(json.dumps({"sent": sent, "generated": res["generated"],
                                                  "engine": {k: str(v) for k, v in engine.kwargs.items()}}))
from polyalign.eval.runner import process_state  # noqa: E402

process_state().wait_for_everyone()
process_state().destroy_process_group()
