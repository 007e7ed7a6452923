"""MSD sampling with vLLM: a fake engine (vLLM is a CUDA-only extra) records what it is asked."""

import importlib.util

import pytest
import torch

from polyalign.errors import PolyalignError
from polyalign.models import LoraSettings, attach_lora, load_model, load_tokenizer
from polyalign.train import msd_trainer as trainer_mod
from polyalign.train import vllm_sampling
from polyalign.train.msd_config import MSDConfig
from polyalign.train.msd_trainer import MSDTrainer, build_msd_examples
from polyalign.train.recipes import Recipe, load_prompts, training_arguments

SPEC = "builtin:tiny-random"


class FakeEngine:
    """Stands for TRL's ``VLLMGeneration``: same methods, records every call. Each completion is a
    function of its prompt, with an EOS in the middle and tokens after it (which must be cut)."""

    def __init__(self, trainer_ref, eos: int):
        self.trainer_ref, self.eos = trainer_ref, eos
        self.generation_kwargs: dict = {}
        self.calls: list[dict] = []
        self.pushes: list[tuple[int, float]] = []        # (global step, checksum of the adapter pushed)

    def sync_weights(self):
        trainer = self.trainer_ref[0]
        lora = sum(float(p.detach().double().sum()) for n, p in trainer.model.named_parameters() if "lora_" in n)
        self.pushes.append((trainer.state.global_step, lora))

    def generate(self, prompts, images, num_generations, profiler=None):
        self.calls.append({"prompts": prompts, "images": images, "n": num_generations,
                           "seed": self.generation_kwargs.get("seed"), "step": self.trainer_ref[0].state.global_step})
        completions = [[5 + sum(p) % 11, 6 + len(p) % 5, self.eos, 9, 9] for p in prompts]
        return prompts, completions, None, None

    def expected(self, prompt):
        return [5 + sum(prompt) % 11, 6 + len(prompt) % 5, self.eos]


def vllm_trainer(tmp_path, monkeypatch, mode="on_policy", accumulation=2, steps=2, **msd):
    monkeypatch.setattr(vllm_sampling, "require_vllm", lambda: None)         # the fake stands in for vLLM
    torch.manual_seed(0)
    model = attach_lora(load_model(SPEC), LoraSettings(r=4, alpha=8))
    model.train()
    tok = load_tokenizer(SPEC)
    cfg = MSDConfig(mode=mode, student_languages=["th", "sw"], max_new_tokens=8, use_vllm=True, **msd)
    examples = build_msd_examples(load_prompts("builtin:harmful", None, "train", 4), cfg)       # 8 examples
    r = Recipe(method="msd", model=SPEC, output_dir=str(tmp_path / "out"),
               training={"max_steps": steps, "learning_rate": 1e-2, "per_device_train_batch_size": 2,
                         "gradient_accumulation_steps": accumulation, "seed": 3})
    ref = []
    engines, built = [], []

    def build_engine(model_, accelerator, tokenizer, cfg_, eos_ids):
        built.append({"model": model_, "cfg": cfg_, "eos_ids": set(eos_ids)})
        engines.append(FakeEngine(ref, tok.eos_token_id))
        return engines[-1]

    monkeypatch.setattr(vllm_sampling, "build_engine", build_engine)
    trainer = MSDTrainer(model, training_arguments(r), cfg, examples, tok)
    ref.append(trainer)
    return trainer, engines, built


def test_one_engine_call_per_optimizer_step_and_samples_reach_the_loss(tmp_path, monkeypatch):
    trainer, engines, built = vllm_trainer(tmp_path, monkeypatch)
    seen = []                                           # (student prompts, responses) the loss is computed on
    real_batch = trainer_mod.response_batch

    def response_batch(prompts, responses, pad):
        seen.append((prompts, responses))
        return real_batch(prompts, responses, pad)

    monkeypatch.setattr(trainer_mod, "response_batch", response_batch)
    hf = []
    monkeypatch.setattr(trainer.model, "generate", lambda *a, **k: hf.append(1))
    trainer.train()
    assert len(engines) == 1 and not hf                 # built once; HF generate never ran
    (engine,) = engines
    # 2 optimizer steps x 2 micro-batches of 2: one call per step, for its 4 prompts, as token ids
    assert [c["step"] for c in engine.calls] == [0, 1] and [len(c["prompts"]) for c in engine.calls] == [4, 4]
    assert all(isinstance(t, int) for c in engine.calls for p in c["prompts"] for t in p)
    assert [c["seed"] for c in engine.calls] == [3, 4] and {c["n"] for c in engine.calls} == {1}
    student = sorted(map(tuple, trainer._prompts(trainer.train_dataset)[0]))
    assert sorted(tuple(p) for c in engine.calls for p in c["prompts"]) == student
    # weights pushed once per step, before its generation; the second push is the trained adapter
    assert [s for s, _ in engine.pushes] == [0, 1] and engine.pushes[0][1] != engine.pushes[1][1]
    # the loss saw exactly the engine's samples, cut after EOS, micro-batch by micro-batch
    loss_inputs = seen[::2]                             # student batch (the teacher's follows each)
    assert len(loss_inputs) == 4
    for prompts, responses in loss_inputs:
        assert responses == [engine.expected(p) for p in prompts]
    assert [p for c in engine.calls for p in c["prompts"]] == [p for prompts, _ in loss_inputs for p in prompts]
    assert trainer.eos_ids <= built[0]["eos_ids"]


def test_off_policy_samples_teacher_prompts_and_never_pushes(tmp_path, monkeypatch):
    trainer, engines, _ = vllm_trainer(tmp_path, monkeypatch, mode="off_policy", accumulation=2, steps=1)
    trainer.train()
    (engine,) = engines
    assert len(engine.calls) == 1 and not engine.pushes           # the engine keeps the initial (teacher) weights
    student, teacher = (set(map(tuple, side)) for side in trainer._prompts(trainer.train_dataset))
    asked = [tuple(p) for p in engine.calls[0]["prompts"]]
    assert len(asked) == 4 and set(asked) <= teacher and not set(asked) & student


def test_step_sampler_unplanned_calls_and_one_push_per_step():
    class Engine:
        def __init__(self):
            self.generation_kwargs, self.calls, self.pushes = {}, [], 0

        def sync_weights(self):
            self.pushes += 1

        def generate(self, prompts, images, num_generations):
            self.calls.append([list(p) for p in prompts])
            return prompts, [[p[0], 0, 7] for p in prompts], None, None

    engine = Engine()
    sampler = vllm_sampling.StepSampler(engine, push_weights=True, seed=10, eos_ids={0})
    sampler.plan([[[1], [2]], [[3], [4]]])
    assert sampler.sample([[1], [2]], step=5) == [[1, 0], [2, 0]]
    assert sampler.sample([[3], [4]], step=5) == [[3, 0], [4, 0]]
    assert engine.calls == [[[1], [2], [3], [4]]] and engine.pushes == 1
    assert sampler.sample([[8]], step=5) == [[8, 0]]            # not planned: its own call, no second push
    assert len(engine.calls) == 2 and engine.pushes == 1 and engine.generation_kwargs["seed"] == 15
    sampler.sample([[9]], step=6)
    assert engine.pushes == 2


def test_engine_options_carry_the_sampling_settings():
    cfg = MSDConfig(temperature=0.7, top_p=0.9, max_new_tokens=64, max_prompt_tokens=100, vllm_mode="server",
                    vllm_server_base_url="http://10.0.0.5:8000", vllm_tensor_parallel_size=2,
                    vllm_gpu_memory_utilization=0.5)
    opts = vllm_sampling.engine_options(cfg, {7, 3})
    assert opts["mode"] == "server" and opts["server_base_url"] == "http://10.0.0.5:8000"
    assert (opts["temperature"], opts["top_p"], opts["max_completion_length"]) == (0.7, 0.9, 64)
    assert (opts["top_k"], opts["min_p"], opts["repetition_penalty"]) == (0, 0.0, 1.0)   # explicit: no server defaults
    assert opts["generation_kwargs"] == {"stop_token_ids": [3, 7]} and opts["max_model_length"] == 164
    assert (opts["tensor_parallel_size"], opts["gpu_memory_utilization"]) == (2, 0.5)
    # they are keyword arguments TRL's VLLMGeneration takes
    import inspect

    from trl.generation.vllm_generation import VLLMGeneration

    assert set(opts) <= set(inspect.signature(VLLMGeneration).parameters)


def test_missing_vllm_is_one_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(PolyalignError) as err:
        MSDConfig(use_vllm=True)
    assert "\n" not in str(err.value) and "pip install 'polyalign[vllm]'" in str(err.value)
    MSDConfig(use_vllm=False)                                   # off: vLLM is never looked for


@pytest.mark.parametrize("bad", [dict(vllm_mode="remote"), dict(vllm_gpu_memory_utilization=0),
                                 dict(vllm_gpu_memory_utilization=1.5), dict(vllm_tensor_parallel_size=0),
                                 dict(vllm_server_port=70000)])
def test_vllm_options_are_validated(bad):
    with pytest.raises(ValueError, match="vllm_"):
        MSDConfig(**bad)
