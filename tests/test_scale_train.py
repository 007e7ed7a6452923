"""Training at scale, as far as a CPU can show it (issue 24): each rank loads onto its own GPU
(mocked CUDA), the frozen teacher of full fine-tuning is loaded, not copied, final/ holds gathered
weights (gloo DDP; torch FSDP on gloo for the head), metrics and teacher gating are shared across
ranks (2 gloo processes), chat rendering without a system role and left truncation of the user
text, model loading options, and one-line errors for malformed recipes and options."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from polyalign.errors import ModelError, PolyalignError
from polyalign.models import load_model, load_tokenizer
from polyalign.models import loading as loading_mod
from polyalign.models.chat import prompt_ids, render_prompt
from polyalign.train.recipes import Recipe, load_recipe, training_device

SPEC = "builtin:tiny-random"
WORKER = Path(__file__).with_name("scale_worker.py")
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


# ------------------------------------------------------------------ placement (mocked CUDA)
@pytest.fixture
def eight_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)


@pytest.fixture
def from_pretrained_calls(monkeypatch, tmp_path):
    """A local model folder whose from_pretrained records its keyword arguments (returns the tiny model)."""
    from transformers import AutoModelForCausalLM

    from polyalign.models.builtin import build_tiny_model

    calls, model = [], build_tiny_model()      # built before CUDA is mocked (its RNG fork would touch it)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda location, **kw: calls.append(kw) or model)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return SimpleNamespace(calls=calls, spec=str(folder))


@pytest.mark.parametrize("rank", [0, 3, 7])
def test_each_rank_loads_straight_onto_its_own_gpu(rank, from_pretrained_calls, eight_gpus, monkeypatch):
    """8 ranks used to load onto cuda:0 (``.to("cuda")`` before any set_device); now rank r gets
    device_map cuda:r, and no model is moved afterwards."""
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    moved = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(a) or self)
    assert loading_mod.local_device() == f"cuda:{rank}"
    assert loading_mod.resolve_device(None) == loading_mod.resolve_device("cuda") == f"cuda:{rank}"
    assert loading_mod.resolve_device("cuda:5") == "cuda:5"            # an explicit device stays as asked
    load_model(from_pretrained_calls.spec, dtype="float32")
    assert from_pretrained_calls.calls[-1]["device_map"] == {"": f"cuda:{rank}"}
    assert not any(a and str(a[0]).startswith("cuda") for a in moved)


def test_trainer_device_is_the_ranks_own_unless_the_engine_places_weights(from_pretrained_calls, eight_gpus,
                                                                           monkeypatch):
    """ZeRO-3 (zero.Init) and FSDP's cpu_ram_efficient_loading load without a device_map."""
    import transformers.integrations as integrations
    import transformers.integrations.fsdp as fsdp

    args = SimpleNamespace(device=torch.device("cuda", 3))
    assert training_device(args) == "cuda:3"
    assert training_device(SimpleNamespace(device=torch.device("cpu"))) == "cpu"
    monkeypatch.setattr(integrations, "is_deepspeed_zero3_enabled", lambda: True)
    assert training_device(args) == "cpu"
    load_model(from_pretrained_calls.spec, dtype="float32", device=training_device(args))
    assert "device_map" not in from_pretrained_calls.calls[-1]
    monkeypatch.setattr(integrations, "is_deepspeed_zero3_enabled", lambda: False)
    monkeypatch.setattr(fsdp, "is_fsdp_enabled", lambda: True)
    assert training_device(args) == "cpu"


def test_run_recipe_sets_up_the_process_state_before_loading(tmp_path, monkeypatch):
    """TrainingArguments / PartialState exist before weights load (zero.Init and per-rank devices
    depend on it), and the model loads on the trainer's device with the recipe's options."""
    from accelerate.state import AcceleratorState, PartialState

    import polyalign.models as models
    from polyalign.train.recipes import DataSettings, run_recipe

    AcceleratorState._reset_state(reset_partial_state=True)
    seen = []
    real = models.load_model

    def spy(spec, **kw):
        seen.append((PartialState._shared_state != {}, kw))
        return real(spec, **kw)

    monkeypatch.setattr(models, "load_model", spy)
    r = Recipe(method="msd", model=SPEC, output_dir=str(tmp_path / "out"), revision="main",
               attn_implementation="eager", data=DataSettings(source="builtin:harmful", limit=2),
               msd={"student_languages": ["th"], "max_new_tokens": 4, "mode": "off_policy", "temperature": 0},
               training={"max_steps": 1, "per_device_train_batch_size": 2, "save_strategy": "no"})
    run_recipe(r)
    assert seen and all(ready for ready, _ in seen)
    kw = seen[0][1]
    assert kw["device"] == "cpu" and kw["revision"] == "main" and kw["attn_implementation"] == "eager"
    assert kw["trust_remote_code"] is False


def test_model_options_reach_from_pretrained(from_pretrained_calls, tmp_path):
    load_model(from_pretrained_calls.spec, dtype="float32", device="cpu", revision="v1.2",
               attn_implementation="sdpa")
    kw = from_pretrained_calls.calls[-1]
    assert kw["revision"] == "v1.2" and kw["attn_implementation"] == "sdpa" and kw["trust_remote_code"] is False
    load_model(from_pretrained_calls.spec, dtype="float32", device="cpu", trust_remote_code=True)
    assert from_pretrained_calls.calls[-1]["trust_remote_code"] is True
    assert "revision" not in from_pretrained_calls.calls[-1]
    r = load_recipe_text("trust_remote_code: true\nrevision: abc123\nattn_implementation: sdpa\n", tmp=tmp_path)
    assert (r.trust_remote_code, r.revision, r.attn_implementation) == (True, "abc123", "sdpa")
    assert Recipe(method="msd", model=SPEC, output_dir="x").trust_remote_code is False


# ------------------------------------------------------------------ full fine-tuning teacher
def test_full_fine_tuning_teacher_is_a_frozen_bf16_load_not_a_copy(tmp_path):
    from polyalign.train.msd_config import MSDConfig
    from polyalign.train.msd_trainer import MSDTrainer, build_msd_examples
    from polyalign.train.recipes import build_model, load_prompts, reference_model, training_arguments

    r = Recipe(method="msd", model=SPEC, output_dir=str(tmp_path / "out"), dtype="bfloat16", lora=None,
               training={"max_steps": 1, "per_device_train_batch_size": 2})
    policy, tok = build_model(r)
    assert next(policy.parameters()).dtype == torch.float32          # fp32 master weights, bf16 autocast
    cfg = MSDConfig(student_languages=["th"], max_new_tokens=4, mode="off_policy", temperature=0)
    examples = build_msd_examples(load_prompts("builtin:harmful", None, "train", 2), cfg)
    for given in (None, reference_model(r)):                        # the trainer's own, and run_recipe's
        trainer = MSDTrainer(policy, training_arguments(r), cfg, examples, tok, ref_model=given)
        teacher = trainer.accelerator.unwrap_model(trainer.ref_model)
        assert teacher is not policy and not teacher.training
        assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
        assert not any(p.requires_grad for p in teacher.parameters())
        ptrs = {p.data_ptr() for p in policy.parameters()}
        assert not any(p.data_ptr() in ptrs for p in teacher.parameters())
        for (name, p), q in zip(policy.named_parameters(), teacher.parameters()):   # the initial weights
            torch.testing.assert_close(q.float(), p.detach().to(torch.bfloat16).float(), msg=name)
    loss = trainer.compute_loss(policy, {"examples": examples[:2]})
    assert torch.isfinite(loss)


# ------------------------------------------------------------------ chat templates and truncation
NO_SYSTEM_TEMPLATE = (  # Gemma-1-like: no system role
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


@pytest.fixture
def no_system_tokenizer():
    tok = load_tokenizer(SPEC)
    tok.bos_token = "<|endoftext|>"
    tok.chat_template = NO_SYSTEM_TEMPLATE
    return tok


def test_system_text_goes_into_the_user_turn_when_the_template_has_no_system_role(no_system_tokenizer):
    tok = no_system_tokenizer
    with pytest.raises(Exception, match="System role not supported"):       # what --system used to hit
        tok.apply_chat_template([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}],
                                tokenize=False)
    text = render_prompt(tok, "How do I bake bread?", system="Answer briefly.")
    assert text == ("<|endoftext|><start_of_turn>user\nAnswer briefly.\n\nHow do I bake bread?<end_of_turn>\n"
                    "<start_of_turn>model\n")
    assert render_prompt(tok, "hi") == "<|endoftext|><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    chatml = load_tokenizer(SPEC)                                   # a template with a system role keeps it
    assert "<|im_start|>system\nAnswer briefly.<|im_end|>" in render_prompt(chatml, "hi", system="Answer briefly.")


@pytest.mark.parametrize("system", [None, "You are a careful assistant."])
def test_long_prompts_lose_the_start_of_the_user_text_not_bos_or_headers(no_system_tokenizer, system):
    tok = no_system_tokenizer
    user = " ".join(f"bread {i}" for i in range(200)) + " final question?"
    full = prompt_ids(tok, user, system)
    limit = 120                      # the tiny BPE spends ~50-70 tokens on the template and system text
    assert len(full) > limit
    cut = prompt_ids(tok, user, system, max_tokens=limit)
    assert limit - 3 <= len(cut) <= limit
    head = prompt_ids(tok, "", system)[:-len(tok("<end_of_turn>\n<start_of_turn>model\n",
                                                  add_special_tokens=False)["input_ids"])]
    assert cut[:len(head)] == head                                  # BOS, system text and user header kept
    assert cut[0] == tok.bos_token_id
    assert cut[-8:] == full[-8:]                                    # the end of the question and the turn end
    text = tok.decode(cut)
    kept = text.split("<start_of_turn>user\n", 1)[1].split("<end_of_turn>", 1)[0]
    if system:
        assert kept.startswith(system)
        kept = kept[len(system) + 2:]
    assert user.endswith(kept) and len(kept) < len(user)
    assert prompt_ids(tok, "short", system, max_tokens=limit) == prompt_ids(tok, "short", system)


# ------------------------------------------------------------------ malformed input: one line, exit 2
def load_recipe_text(extra: str, overrides: list[str] | None = None, tmp: Path | None = None):
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=tmp, delete=False) as fh:
        fh.write(f"method: msd\nmodel: {SPEC}\noutput_dir: out\nmsd: {{student_languages: [th]}}\n{extra}")
    return load_recipe(fh.name, overrides or [])


@pytest.mark.parametrize("extra, overrides, message", [
    ("training: {learning_rate: -1}\n", [], "learning_rate must be >= 0, got -1"),
    ("", ["learning_rate=abc"], "learning_rate must be a number, got 'abc'"),
    ("", ["msd.benign_weight=abc"], "benign_weight must be a number, got 'abc'"),
    ("", ["msd.max_prompt_tokens=-5"], "max_prompt_tokens must be a positive number, got -5"),
    ("", ["msd.top_k=0"], "top_k must be a positive number, got 0"),
    ("", ["msd.top_p=1.5"], "top_p"),
    ("", ["msd.student_languages=th"], "student_languages must be a list of text, got 'th'"),
    ("", ["msd.teacher_gating=maybe"], "teacher_gating must be true or false, got 'maybe'"),
    ("", ["data.limit=-3"], "limit must be a positive number of prompts"),
    ("", ["dtype=float8"], "unknown dtype 'float8'"),
    ("", ["seed=-1"], "seed must be >= 0"),
    ("", ["seed=1.5"], "seed must be a whole number, got 1.5"),
    ("", ["max_steps=0"], "max_steps must be >= 1"),
    ("", ["per_device_train_batch_size=0"], "per_device_train_batch_size must be >= 1"),
    ("", ["lora.r=-4"], "r must be a positive number, got -4"),
    ("", ["lora.dropout=1.5"], "dropout must be in [0, 1)"),
    ("mlc: {dim: 0}\n", [], "dim must be a positive number, got 0"),
    ("", ["trust_remote_code=yes please"], "trust_remote_code must be true or false"),
])
def test_malformed_recipe_values_are_named(extra, overrides, message, tmp_path):
    with pytest.raises(PolyalignError) as err:
        load_recipe_text(extra, overrides, tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_devices_are_named():
    for bad in ("tpu", "cuda:x", "gpu0"):
        with pytest.raises(ModelError, match=f"--device {bad}: unknown device"):
            loading_mod.resolve_device(bad)
    assert loading_mod.resolve_device("cpu") == "cpu"


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "polyalign.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("case", ["learning_rate", "benign_weight", "device"])
def test_the_issues_malformed_inputs_end_in_one_line_and_exit_2(case, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: msd\nmodel: {SPEC}\noutput_dir: {tmp_path / 'out'}\n"
                      "msd: {student_languages: [th]}\ntraining: {learning_rate: -1}\n")
    args = {"learning_rate": ("train", recipe),
            "benign_weight": ("train", "msd_onpolicy", "msd.benign_weight=abc", "--output-dir", tmp_path / "o"),
            "device": ("eval", "--model", SPEC, "--device", "tpu", "--out", tmp_path / "e", "--limit", "1")}[case]
    res = run_cli(*args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert {"learning_rate": "learning_rate must be >= 0", "benign_weight": "benign_weight must be a number",
            "device": "--device tpu"}[case] in lines[0]


# ------------------------------------------------------------------ 2 processes (gloo)
def _launch(mode: str, out: Path, extra: list[str] | None = None):
    cmd = [*(extra or LAUNCH), str(WORKER), mode, str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]


@pytest.mark.distributed
def test_metrics_are_means_over_both_ranks_and_gating_probes_each_prompt_once(tmp_path):
    out = tmp_path / "gm"
    _launch("gate_metrics", out)
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]
    # gating: each prompt probed by exactly one rank, all of them probed, the same kept set on both
    probed = [tuple(p) for r in ranks for p in r["probed"]]
    assert len(probed) == len(set(probed)) == ranks[0]["examples"]
    assert all(r["probed"] for r in ranks)
    assert ranks[0]["dataset"] == ranks[1]["dataset"] and ranks[0]["dataset"]
    assert (out / "run" / "teacher_gate.json").exists()
    assert len(json.loads((out / "run" / "teacher_gate.json").read_text())) == ranks[0]["examples"]
    # metrics: the mean over every item of both ranks (a key only rank 1 has still counts rank 1's items)
    for key in ("loss/harmful", "loss/benign", "divergence/th", "divergence/sw"):
        items = [x for r in ranks for x in r["items"][key]]
        for r in ranks:
            assert r["logs"][key] == pytest.approx(sum(items) / len(items), rel=1e-5), key
    for r in ranks:
        assert r["logs"]["mlc/loss"] == pytest.approx((1.0 + 3.0 + 5.0) / 3, rel=1e-6)
        assert r["logs"]["response_length"] == pytest.approx((2 + 3 + 2 + 3 + 3) / 5)   # first row of each rank: 2 tokens
        assert r["logs"]["dpsw_raw_weight"] == pytest.approx(0.5)
        assert {"fidelity/th", "fidelity/sw"} <= set(r["logs"])


@pytest.mark.distributed
def test_final_checkpoint_holds_the_trained_weights_under_ddp(tmp_path):
    from safetensors.torch import load_file

    from polyalign.models.adapters import EXTRA_HEADS_FILE

    out = tmp_path / "train"
    _launch("train", out)
    final, ckpt = out / "run" / "final", out / "run" / "checkpoint-2"
    adapter, trained = load_file(final / "adapter_model.safetensors"), load_file(ckpt / "adapter_model.safetensors")
    assert adapter.keys() == trained.keys() and adapter
    for k, v in adapter.items():
        assert v.numel() > 0 and torch.equal(v, trained[k]), k
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())      # moved from its zero init
    heads, head_ckpt = load_file(final / EXTRA_HEADS_FILE), load_file(ckpt / "mlc_head.safetensors")
    assert {k.removeprefix("mlc_head.") for k in heads} == set(head_ckpt)
    for k, v in head_ckpt.items():
        assert v.numel() > 0 and torch.equal(heads[f"mlc_head.{k}"], v)
    info = json.loads((final / "polyalign_checkpoint.json").read_text())
    assert info["adapter"] is True and info["base_model"] == SPEC
    assert (final / "tokenizer_config.json").exists() and (final / "log_history.json").exists()


@pytest.mark.distributed
def test_mlc_head_is_gathered_from_fsdp_shards(tmp_path):
    """torch FSDP FULL_SHARD over gloo: each rank holds part of the head (rank 0's local state is empty
    or partial, which is what was saved); gathered_state gives the main process the whole head, and
    load_head (``--resume``) puts a saved head back into the shards."""
    out = tmp_path / "fsdp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    _launch("fsdp_head", out, torchrun)
    r0 = torch.load(out / "rank0.pt")
    assert any(v.shape != r0["full"][k].shape for k, v in r0["local"].items())         # a shard, not the head
    assert r0["gathered"].keys() == r0["full"].keys()
    for k, v in r0["full"].items():
        torch.testing.assert_close(r0["gathered"][k], v, rtol=0, atol=0)
    assert r0["loaded"] and r0["reloaded"].keys() == r0["saved"].keys()
    for k, v in r0["saved"].items():
        torch.testing.assert_close(r0["reloaded"][k], v, rtol=0, atol=0)


def test_trained_head_fused_inside_the_fsdp_forward_equals_full_logits(tmp_path):
    """Full fine-tuning under torch FSDP FULL_SHARD on 2 gloo processes: outside the forward each rank
    holds a shard of the (tied) head; the fused divergence computed inside the wrapper's forward
    gives the loss and every full gradient of a one-process full-logits reference."""
    out = tmp_path / "fsdp_trained"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    _launch("fsdp_trained_head", out, torchrun)
    for rank in range(2):
        r = torch.load(out / f"rank{rank}.pt")
        assert r["outside"] != tuple(r["ref_grads"]["model.embed_tokens.weight"].shape)   # tied head: sharded outside
        torch.testing.assert_close(r["loss"], r["ref_loss"], rtol=1e-5, atol=1e-6)
        assert set(r["grads"]) == set(r["ref_grads"])
        for n, g in r["ref_grads"].items():
            torch.testing.assert_close(r["grads"][n], g, rtol=1e-4, atol=1e-4 * float(g.abs().max()))


def test_training_arguments_that_transformers_rejects_are_one_line():
    from polyalign.train.recipes import training_arguments

    r = Recipe(method="msd", model=SPEC, output_dir="x", training={"lr_scheduler_type": "sometimes"})
    with pytest.raises(PolyalignError, match="training: .*sometimes") as err:
        training_arguments(r)
    assert "\n" not in str(err.value)


def test_teacher_gating_refuses_fsdp_efficient_loading(tmp_path, monkeypatch):
    """Ranks other than 0 hold meta weights until FSDP syncs them at train(): gating would probe with
    none. The run stops at once with the setting to change."""
    import transformers.integrations.fsdp as fsdp

    from polyalign.models import LoraSettings, attach_lora
    from polyalign.train.msd_config import MSDConfig
    from polyalign.train.msd_trainer import MSDTrainer, build_msd_examples
    from polyalign.train.recipes import load_prompts, training_arguments

    cfg = MSDConfig(student_languages=["th"], max_new_tokens=4, teacher_gating=True)
    examples = build_msd_examples(load_prompts("builtin:harmful", None, "train", 2), cfg)
    r = Recipe(method="msd", model=SPEC, output_dir=str(tmp_path / "out"), training={"max_steps": 1})
    monkeypatch.setattr(fsdp, "is_fsdp_enabled", lambda: True)
    with pytest.raises(PolyalignError, match="fsdp_cpu_ram_efficient_loading"):
        MSDTrainer(attach_lora(load_model(SPEC), LoraSettings(r=4, alpha=8)), training_arguments(r), cfg, examples,
                   load_tokenizer(SPEC))


def test_training_prompts_keep_the_chat_header_when_cut():
    """MLC's prompt variants (and MSD's contexts, through the same prompt_ids) keep the template's
    opening turn header when a long prompt is cut to max_length."""
    from polyalign.data.records import ParallelRecord
    from polyalign.train.mlc_config import MLCConfig
    from polyalign.train.mlc_trainer import mlc_rows

    tok = load_tokenizer(SPEC)
    long = " ".join(f"bread {i}" for i in range(300))
    rec = ParallelRecord(id="r1", texts={"en": long, "zh": "你好" * 200}, category="harmful",
                         meta={"chosen": "No.", "rejected": "Sure."})
    cfg = MLCConfig(languages=["en", "zh"], max_length=100)
    header = tok("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    footer = tok("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for ids in mlc_rows([rec], cfg, tok)[0]["mlc_prompt_ids"]:
        assert len(ids) <= 100 and ids[:len(header)] == header and ids[-len(footer):] == footer


def test_mlc_head_resume_under_zero3_loads_inside_a_modifying_gather(tmp_path, monkeypatch):
    """ZeRO-3: the head's partitions are gathered with modifier_rank=0 while the saved values go in, so
    the engine re-partitions rank 0's values on exit (a stand-in GatheredParameters records it)."""
    import contextlib
    import importlib.machinery
    import types

    from polyalign.losses.mlc import MLCHead
    from polyalign.train.mlc_term import load_head, save_head

    head, saved = MLCHead(8, 4, "linear", seed=1), MLCHead(8, 4, "linear", seed=2)
    save_head({k: v.detach().clone() for k, v in saved.state_dict().items()}, tmp_path)
    for p in head.parameters():
        p.ds_id = 1
    gathers = []

    @contextlib.contextmanager
    def gathered(params, modifier_rank=None):
        gathers.append(modifier_rank)
        yield

    ds = types.ModuleType("deepspeed")
    ds.__spec__ = importlib.machinery.ModuleSpec("deepspeed", None)
    ds.zero = types.SimpleNamespace(GatheredParameters=gathered)
    monkeypatch.setitem(sys.modules, "deepspeed", ds)
    assert load_head(head, tmp_path) and gathers == [0]
    for k, v in saved.state_dict().items():
        torch.testing.assert_close(head.state_dict()[k], v, rtol=0, atol=0)
    assert not load_head(head, tmp_path / "none")
