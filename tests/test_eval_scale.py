"""Evaluation at scale (issue #24): judges on the model's device and batched, the vLLM backend
(token prompts, options, a cache keyed by the adapter's content), no weight copies off the CPU,
per-rank placement, and `polyalign eval` under `accelerate launch` equal to one process."""

import json
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from polyalign.errors import PolyalignError
from polyalign.eval.generation import VLLMSettings, lora_rank_for_vllm
from polyalign.models import LoraSettings, attach_lora, load_model, load_tokenizer, save_checkpoint

SPEC = "builtin:tiny-random"


# --- judges: inputs follow the model, and items go in batches --------------------------------------

class _DeviceRecorder(torch.nn.Module):
    """Stands in for a model on an accelerator: its one parameter lives on ``meta`` (a device that
    is not the CPU and exists on every machine); it records where its inputs were and answers from
    a real CPU model."""

    def __init__(self, inner):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.empty(1, device="meta"))
        self.inner, self.seen, self.calls = inner, [], 0

    def _cpu(self, kwargs):
        self.seen += [v.device.type for v in kwargs.values() if torch.is_tensor(v)]
        self.calls += 1
        return {k: torch.zeros(v.shape, dtype=v.dtype) if torch.is_tensor(v) and v.device.type == "meta" else v
                for k, v in kwargs.items()}

    def generate(self, **kwargs):
        return self.inner.generate(**self._cpu(kwargs))

    def forward(self, **kwargs):
        return self.inner(**self._cpu(kwargs))


def test_local_judges_send_inputs_to_the_model_device(tiny):
    from polyalign.eval.judges import GuardJudge, JudgeItem, LLMJudge
    from polyalign.models.backends import HFChat

    model, tok = tiny
    chat = HFChat.__new__(HFChat)
    chat.tok, chat.model, chat.max_new_tokens, chat.batch_size = tok, _DeviceRecorder(model), 3, 16
    LLMJudge(chat, "llm:x").judge([JudgeItem("q", "r", "en")])
    guard = GuardJudge.__new__(GuardJudge)
    guard.tok, guard.model, guard.threshold, guard.batch_size = tok, _DeviceRecorder(model), 0.5, 16
    guard.safe_id, guard.unsafe_id = 1, 2
    guard.judge([JudgeItem("q", "r", "en")])
    assert chat.model.seen and set(chat.model.seen) == {"meta"}
    assert guard.model.seen and set(guard.model.seen) == {"meta"}


def test_local_judges_batch_and_agree_with_one_at_a_time(tiny):
    from polyalign.eval.judges import GuardJudge, JudgeItem, LLMJudge
    from polyalign.models.backends import HFChat

    model, tok = tiny
    items = [JudgeItem(f"question {i} " * (i + 1), f"answer number {i}" * (1 + i % 3), "en") for i in range(5)]

    def chat(batch_size):
        c = HFChat.__new__(HFChat)
        c.tok, c.model, c.max_new_tokens, c.batch_size = tok, _DeviceRecorder(model), 6, batch_size
        c.model.anchor = torch.nn.Parameter(torch.empty(1))           # on the CPU this time
        return c
    batched, single = chat(4), chat(1)
    v4 = LLMJudge(batched, "llm:x").judge(items)
    v1 = LLMJudge(single, "llm:x").judge(items)
    assert (batched.model.calls, single.model.calls) == (2, 5)        # 5 items: batches of 4 + 1
    assert [v.to_json() for v in v4] == [v.to_json() for v in v1]
    assert len(set(batched.complete_many("s", [f"Query: {it.query}" for it in items]))) > 1

    def guard(batch_size):
        g = GuardJudge.__new__(GuardJudge)
        g.tok, g.model, g.threshold, g.batch_size, g.safe_id, g.unsafe_id = tok, model, 0.5, batch_size, 5, 9
        return g
    pairs = [(it.query, it.response) for it in items]
    p4, p1 = guard(4).p_unsafe_many(pairs), guard(1).p_unsafe_many(pairs)
    assert p4 == pytest.approx(p1, abs=1e-5) and len({round(p, 6) for p in p1}) > 1


# --- merged_for_generation copies nothing off the CPU ---------------------------------------------

def test_merged_for_generation_leaves_an_accelerator_model_unmerged():
    from polyalign.eval.runner import merged_for_generation

    peft_model = attach_lora(load_model(SPEC), LoraSettings(r=4, alpha=8)).to("meta")
    clones = []
    real_clone = torch.Tensor.clone

    def counting_clone(t, *a, **k):
        clones.append(t.shape)
        return real_clone(t, *a, **k)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "clone", counting_clone)
        with merged_for_generation(peft_model):
            merged = [m for m in peft_model.modules() if getattr(m, "merged", False)]
    assert merged == [] and clones == []


def test_merged_for_generation_still_merges_and_restores_on_the_cpu():
    from polyalign.eval.runner import merged_for_generation

    peft_model = attach_lora(load_model(SPEC), LoraSettings(r=4, alpha=8))
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    with merged_for_generation(peft_model):
        assert not any(getattr(m, "base_layer", None) is not None for m in peft_model.modules())
    after = peft_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)



@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("alpha", [8, 6])
def test_merged_for_generation_holds_pefts_merged_weights_without_writing_the_base(dtype, alpha):
    """The stand-ins carry exactly what ``merge_adapter`` writes (bf16: base + delta rounded once),
    for a power-of-two scaling (alpha 8, r 4) and another (alpha 6); the base weights stay as they
    are while the stand-ins generate (the wrappers, and their base layers, are only out of the tree)."""
    from polyalign.eval.runner import merged_for_generation

    torch.manual_seed(alpha)
    peft_model = attach_lora(load_model(SPEC, dtype=dtype), LoraSettings(r=4, alpha=alpha))
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    names = [n for n, m in peft_model.named_modules() if getattr(m, "base_layer", None) is not None]
    wrappers = {n: peft_model.get_submodule(n) for n in names}
    base = {n: w.base_layer.weight.detach().clone() for n, w in wrappers.items()}
    with merged_for_generation(peft_model):
        held = {n: peft_model.get_submodule(n).weight.detach().clone() for n in names}
        assert all(torch.equal(w.base_layer.weight, base[n]) for n, w in wrappers.items())
    peft_model.merge_adapter()
    for n in names:
        merged = peft_model.get_submodule(n).base_layer.weight
        assert held[n].dtype == merged.dtype and torch.equal(held[n], merged), n


def test_merged_for_generation_merges_in_place_what_it_cannot_copy():
    """A DoRA adapter has no plain delta: it is merged in place and restored, as before."""
    from peft import LoraConfig, get_peft_model

    from polyalign.eval.runner import merged_for_generation

    torch.manual_seed(0)
    model = get_peft_model(load_model(SPEC), LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 100, (2, 6))
    with torch.no_grad():
        want = model(input_ids=x).logits
        with merged_for_generation(model):
            assert not any(getattr(m, "base_layer", None) is not None for m in model.modules())
            got = model(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# --- per-rank placement ------------------------------------------------------------------------------

def test_each_rank_loads_its_model_on_its_own_device(monkeypatch, tmp_path):
    """Under a launcher with 2 CUDA ranks, rank 1 loads onto cuda:1 (not cuda:0); a device the
    user names wins; one process keeps the default policy."""
    import polyalign.models as models
    from polyalign.eval import runner

    rank1 = SimpleNamespace(num_processes=2, process_index=1, is_main_process=False,
                            device=torch.device("cuda", 1))
    assert runner.rank_device(None, rank1) == "cuda:1" and runner.rank_device("auto", rank1) == "cuda:1"
    assert runner.rank_device("cpu", rank1) == "cpu"
    assert runner.rank_device(None, SimpleNamespace(num_processes=1, device=torch.device("cuda", 0))) is None

    asked = []

    class Stop(Exception):
        pass

    def fake_load(spec, adapter, dtype=None, device=None, **kw):
        asked.append(device)
        raise Stop
    monkeypatch.setattr(runner, "process_state", lambda device=None: rank1)
    monkeypatch.setattr(models, "load_with_adapter", fake_load)
    with pytest.raises(Stop):
        runner.run_eval(runner.EvalConfig(model=SPEC, out=str(tmp_path / "e"), limit=1))
    assert asked == ["cuda:1"]


# --- the vLLM backend, with a fake engine that records what it was asked ---------------------------

class _FakeLLM:
    instances: list = []

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []
        _FakeLLM.instances.append(self)

    def generate(self, prompts, params, lora_request=None, use_tqdm=True):
        self.calls.append({"prompts": prompts, "params": params, "lora": lora_request})
        tag = lora_request.lora_int_id if lora_request else 0
        return [SimpleNamespace(outputs=[SimpleNamespace(text=f" answer {len(p['prompt_token_ids'])} {tag} ")])
                for p in prompts]


@pytest.fixture
def fake_vllm(monkeypatch):
    from polyalign.eval import generation

    vllm = types.ModuleType("vllm")
    vllm.LLM = _FakeLLM
    vllm.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    lora, request = types.ModuleType("vllm.lora"), types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda name, int_id, path: SimpleNamespace(lora_name=name, lora_int_id=int_id, lora_path=path)
    for name, mod in {"vllm": vllm, "vllm.lora": lora, "vllm.lora.request": request}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    _FakeLLM.instances = []
    monkeypatch.setattr(generation, "_ENGINES", {})
    return _FakeLLM


def _model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "base"
    load_model(SPEC).save_pretrained(folder)
    load_tokenizer(SPEC).save_pretrained(folder)
    return folder


def _adapter(tmp_path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = attach_lora(load_model(SPEC), LoraSettings(r=4, alpha=8))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return save_checkpoint(model, tmp_path / "adapter")


def test_vllm_gets_token_prompts_and_its_engine_options(fake_vllm, tmp_path):
    from polyalign.eval.runner import EvalConfig, run_eval
    from polyalign.models.chat import prompt_ids

    base, adapter = _model_folder(tmp_path), _adapter(tmp_path, 0)
    cfg = EvalConfig(model=str(base), adapter=str(adapter), backend="vllm", out=str(tmp_path / "run"), limit=3,
                     languages="en,th", dtype="bfloat16", seed=7, vllm_tensor_parallel=2,
                     vllm_gpu_memory_utilization=0.5, vllm_max_model_len=1024)
    res = run_eval(cfg)
    (engine,) = fake_vllm.instances
    assert engine.kwargs["tensor_parallel_size"] == 2 and engine.kwargs["dtype"] == "bfloat16"
    assert engine.kwargs["seed"] == 7 and engine.kwargs["gpu_memory_utilization"] == 0.5
    assert engine.kwargs["max_model_len"] == 1024 and engine.kwargs["enable_lora"] is True
    assert engine.kwargs["max_lora_rank"] == 8                 # r=4, rounded up to a rank vLLM serves
    assert "distributed_executor_backend" not in engine.kwargs  # one process: vLLM's own executor
    tok = load_tokenizer(str(base))
    sent = [p for call in engine.calls for p in call["prompts"]]
    texts = [json.loads(line)["prompt"] for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    # token ids, exactly what the hf backend feeds generate: no text for vLLM to tokenize (and BOS) again
    assert sent == [{"prompt_token_ids": prompt_ids(tok, t)} for t in texts] and len(sent) == 6
    assert engine.calls[0]["params"].temperature == 0.0 and engine.calls[0]["params"].seed == 7
    assert res["generated"] == 6 and res["fingerprint"].startswith(f"vllm:{base}:bfloat16:")


def test_vllm_cache_follows_the_adapter_content_not_its_path(fake_vllm, tmp_path):
    from polyalign.eval.runner import EvalConfig, run_eval

    base = _model_folder(tmp_path)
    cfg = EvalConfig(model=str(base), adapter=str(_adapter(tmp_path, 0)), backend="vllm", out=str(tmp_path / "run"),
                     limit=2, languages="en")
    first = run_eval(cfg)
    again = run_eval(cfg)
    assert (first["generated"], again["generated"], again["cached"]) == (2, 0, 2)
    _adapter(tmp_path, 1)                              # retrained into the same folder
    retrained = run_eval(cfg)
    assert retrained["generated"] == 2 and retrained["fingerprint"] != first["fingerprint"]
    ids = {c["lora"].lora_int_id for e in fake_vllm.instances for c in e.calls}
    assert len(ids) == 2                               # vLLM never serves the old weights from its LoRA cache


def test_vllm_under_a_launcher_joins_its_process_group(fake_vllm, tmp_path):
    from polyalign.eval.generation import VLLMGenerator

    gen = VLLMGenerator(str(_model_folder(tmp_path)), None, options=VLLMSettings(tensor_parallel=2), launched=True)
    assert gen.engine_args["distributed_executor_backend"] == "external_launcher"
    assert gen.ranks_per_engine == 2 and gen.engine_args["enable_lora"] is False


def test_vllm_options_are_checked(tmp_path, fake_vllm):
    from polyalign.eval.generation import VLLMGenerator
    from polyalign.eval.runner import EvalConfig

    adapter = _adapter(tmp_path, 0)
    assert lora_rank_for_vllm(adapter) == 8 and lora_rank_for_vllm(adapter, 64) == 64
    with pytest.raises(PolyalignError, match="below the rank"):
        lora_rank_for_vllm(adapter, 2)
    with pytest.raises(PolyalignError, match="vllm-gpu-memory-utilization"):
        EvalConfig(model=SPEC, vllm_gpu_memory_utilization=1.5)
    with pytest.raises(PolyalignError, match="vllm-tensor-parallel"):
        EvalConfig(model=SPEC, vllm_tensor_parallel=0)
    with pytest.raises(PolyalignError, match="safetensors model folder"):
        VLLMGenerator(SPEC)


def test_sweep_evaluates_through_vllm(tmp_path):
    from polyalign.sweep import EvalSpec, _eval_config

    cfg = _eval_config(EvalSpec(backend="vllm", vllm_tensor_parallel=2, vllm_max_lora_rank=32), "m", "builtin-harmful",
                       tmp_path, "adapter")
    assert (cfg.backend, cfg.vllm_tensor_parallel, cfg.vllm_max_lora_rank) == ("vllm", 2, 32)


# --- `polyalign eval` under accelerate launch ----------------------------------------------------------

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", "-m", "polyalign.cli"]


def _eval_cmd(out: Path) -> list[str]:
    # 2 languages x 5 prompts at batch size 3: 4 batches, dealt 2 per round, the last round uneven
    return ["eval", "--model", SPEC, "--out", str(out), "--languages", "en,th", "--limit", "5",
            "--batch-size", "3", "--max-new-tokens", "6"]


def _comparable(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in ("provenance",)}


@pytest.mark.distributed
def test_eval_under_accelerate_launch_equals_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run = [sys.executable, "-m", "polyalign.cli", *_eval_cmd(one)]
    res1 = subprocess.run(run, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert res1.returncode == 0, res1.stderr[-3000:]
    res2 = subprocess.run([*LAUNCH, *_eval_cmd(two)], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert res2.returncode == 0, res2.stderr[-3000:]
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert _comparable(r1) == _comparable(r2) and r2["generated"] == 10
    g1, g2 = ((d / "generations.jsonl").read_text().splitlines() for d in (one, two))
    assert g1 == g2                                   # same rows, same order: each prompt generated once
    assert len({json.loads(line)["key"] for line in g2}) == len(g2) == 10
    assert (one / "judged.jsonl").read_text() == (two / "judged.jsonl").read_text()
    assert res2.stdout.count("builtin-harmful") == res1.stdout.count("builtin-harmful")   # one table
    # a rerun under the launcher generates nothing: the main process's cache decides for every rank
    res3 = subprocess.run([*LAUNCH, *_eval_cmd(two)], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert res3.returncode == 0, res3.stderr[-3000:]
    r3 = json.loads((two / "results.json").read_text())
    assert (r3["generated"], r3["cached"]) == (0, 10)
    assert (two / "generations.jsonl").read_text().splitlines() == g2


def test_close_vllm_engines_shuts_down_and_forgets_them(fake_vllm, tmp_path):
    """A sweep trains on the same GPU after each evaluation: its engines must go."""
    from polyalign.eval import generation

    gen = generation.VLLMGenerator(str(_model_folder(tmp_path)))
    again = generation.VLLMGenerator(str(_model_folder(tmp_path)))
    assert again.llm is gen.llm and len(fake_vllm.instances) == 1      # one engine per engine-argument set
    stopped = []
    gen.llm.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=lambda: stopped.append(1)))
    generation.close_vllm_engines()
    assert stopped == [1] and generation._ENGINES == {}
    generation.VLLMGenerator(str(_model_folder(tmp_path)))
    assert len(fake_vllm.instances) == 2


@pytest.mark.distributed
def test_vllm_engines_under_accelerate_launch_split_the_prompts(tmp_path):
    """2 ranks at tensor parallel 1: two engines, each sent its own batches; at tensor parallel 2:
    one engine over both ranks, each rank sending it the same prompts. Either way the results hold
    each prompt once and equal one process's."""
    worker = Path(__file__).with_name("eval_vllm_worker.py")
    base = _model_folder(tmp_path)
    launch = LAUNCH[:-2]                                  # without "-m polyalign.cli"
    outs = {}
    for name, cmd in {"one": [sys.executable, str(worker)], "tp1": [*launch, str(worker)],
                      "tp2": [*launch, str(worker)]}.items():
        out = tmp_path / name
        res = subprocess.run([*cmd, str(base), str(out), "2" if name == "tp2" else "1"], capture_output=True,
                             text=True, cwd=tmp_path, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        outs[name] = out
    ranks = {name: [json.loads((outs[name] / f"rank{r}.json").read_text()) for r in (0, 1)] for name in ("tp1", "tp2")}
    one = json.loads((outs["one"] / "rank0.json").read_text())
    all_prompts = sorted(p for call in one["sent"] for p in call)
    r0, r1 = (sorted(p for call in r["sent"] for p in call) for r in ranks["tp1"])
    assert r0 and r1 and not set(map(tuple, r0)) & set(map(tuple, r1)) and sorted(r0 + r1) == all_prompts
    assert ranks["tp2"][0]["sent"] == ranks["tp2"][1]["sent"] and sorted(
        p for call in ranks["tp2"][0]["sent"] for p in call) == all_prompts
    for name in ("tp1", "tp2"):
        assert all(r["engine"]["distributed_executor_backend"] == "external_launcher" for r in ranks[name])
        assert all(r["generated"] == 10 for r in ranks[name])
        assert (outs[name] / "generations.jsonl").read_text() == (outs["one"] / "generations.jsonl").read_text()
        assert (outs[name] / "judged.jsonl").read_text() == (outs["one"] / "judged.jsonl").read_text()
    assert ranks["tp2"][0]["engine"]["tensor_parallel_size"] == "2"


def test_vllm_tensor_parallel_must_divide_the_launched_ranks(fake_vllm, monkeypatch, tmp_path):
    from polyalign.eval import runner

    three = SimpleNamespace(num_processes=3, process_index=0, is_main_process=True, device=torch.device("cpu"))
    monkeypatch.setattr(runner, "process_state", lambda device=None: three)
    cfg = runner.EvalConfig(model=str(_model_folder(tmp_path)), backend="vllm", out=str(tmp_path / "e"), limit=1,
                            vllm_tensor_parallel=2)
    with pytest.raises(PolyalignError, match="does not divide the 3 launched processes"):
        runner.run_eval(cfg)
    assert fake_vllm.instances == []


def test_batch_size_default_follows_backend_and_device():
    """The CPU keeps its measured 32; a model on an accelerator gets 128 and vLLM calls 512."""
    from polyalign.eval.runner import EvalConfig, batch_size

    on_cpu, elsewhere = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2, device="meta")
    assert batch_size(EvalConfig(model=SPEC), on_cpu) == 32
    assert batch_size(EvalConfig(model=SPEC), elsewhere) == 128
    assert batch_size(EvalConfig(model=SPEC, backend="vllm"), None) == 512
    assert batch_size(EvalConfig(model=SPEC, batch_size=7), elsewhere) == 7
