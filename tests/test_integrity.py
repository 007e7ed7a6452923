"""A run's results describe the weights that produced them (issue #17) and the dtype/device policy
(issue #13): adapters applied or refused, fingerprints, dtype recorded, explicit generation settings."""

import json

import pytest
import torch

from polyalign.errors import ModelError, PolyalignError
from polyalign.eval.runner import EvalConfig, run_eval
from polyalign.models import attach_lora, load_model, load_tokenizer, save_checkpoint
from polyalign.models.adapters import LoraSettings, adapter_sha256, carries_adapter, is_peft
from polyalign.models.loading import (
    cpu_has_fast_bf16,
    default_dtype,
    resolve_device,
    resolve_dtype,
    weights_fingerprint,
)


def _adapter(tmp_path, seed: int):
    """A LoRA adapter on tiny-random whose B matrices are non-zero (a fresh LoRA is a no-op)."""
    torch.manual_seed(seed)
    model = attach_lora(load_model("builtin:tiny-random"), LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return save_checkpoint(model, tmp_path / f"adapter{seed}", load_tokenizer("builtin:tiny-random"))


def _cfg(tmp_path, name, **kw):
    base = {"model": "builtin:tiny-random", "task": "builtin-harmful", "out": str(tmp_path / name),
            "languages": "en,zh", "limit": 3, "max_new_tokens": 8, "batch_size": 8}
    return EvalConfig(**{**base, **kw})


def _responses(tmp_path, name):
    return [json.loads(line)["response"] for line in (tmp_path / name / "judged.jsonl").read_text().splitlines()]


def test_api_applies_adapter_to_a_passed_base_model_and_restores_it(tmp_path):
    adapter = _adapter(tmp_path, 1)
    base, tok = load_model("builtin:tiny-random"), load_tokenizer("builtin:tiny-random")
    plain = run_eval(_cfg(tmp_path, "base"), model=base, tokenizer=tok)
    passed = run_eval(_cfg(tmp_path, "passed", adapter=str(adapter)), model=base, tokenizer=tok)
    loaded = run_eval(_cfg(tmp_path, "loaded", adapter=str(adapter)))        # the path that loads itself
    assert _responses(tmp_path, "passed") == _responses(tmp_path, "loaded")
    assert _responses(tmp_path, "passed") != _responses(tmp_path, "base")
    assert passed["fingerprint"] == loaded["fingerprint"] != plain["fingerprint"]
    assert passed["adapter_sha256"] == adapter_sha256(adapter) and plain["adapter_sha256"] is None
    assert passed["dtype"] == plain["dtype"] == default_dtype()
    # the caller's base model leaves as it came in
    assert not is_peft(base) and not any("lora_" in k for k in base.state_dict())
    run_eval(_cfg(tmp_path, "base2"), model=base, tokenizer=tok)
    assert _responses(tmp_path, "base2") == _responses(tmp_path, "base")


def test_api_refuses_a_peft_model_carrying_another_adapter(tmp_path):
    from polyalign.models.adapters import load_with_adapter

    a1, a2 = _adapter(tmp_path, 1), _adapter(tmp_path, 2)
    model = load_with_adapter("builtin:tiny-random", a1)
    assert carries_adapter(model, a1) and not carries_adapter(model, a2)
    tok = load_tokenizer("builtin:tiny-random")
    with pytest.raises(PolyalignError, match="different adapter"):
        run_eval(_cfg(tmp_path, "wrong", adapter=str(a2)), model=model, tokenizer=tok)
    ok = run_eval(_cfg(tmp_path, "right", adapter=str(a1)), model=model, tokenizer=tok)
    assert ok["fingerprint"] == weights_fingerprint(model)


def test_cli_eval_records_adapter_hash_and_dtype(tmp_path):
    from typer.testing import CliRunner

    from polyalign.cli import app

    adapter = _adapter(tmp_path, 3)
    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["eval", "--model", "builtin:tiny-random", "--adapter", str(adapter),
                                   "--languages", "en", "--limit", "2", "--max-new-tokens", "4",
                                   "--dtype", "float32", "--out", str(out)])
    assert res.exit_code == 0, res.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["adapter_sha256"] == adapter_sha256(adapter)
    assert saved["dtype"] == "float32" and saved["device"] == "cpu"


def test_fingerprint_covers_dtype_and_adapter_weights(tmp_path):
    a1, a2 = _adapter(tmp_path, 1), _adapter(tmp_path, 2)
    from polyalign.models.adapters import load_with_adapter

    f32 = weights_fingerprint(load_model("builtin:tiny-random", dtype="float32"))
    bf16 = weights_fingerprint(load_model("builtin:tiny-random", dtype="bfloat16"))
    assert f32 != bf16
    assert (weights_fingerprint(load_with_adapter("builtin:tiny-random", a1))
            != weights_fingerprint(load_with_adapter("builtin:tiny-random", a2)))


def test_dtype_policy_reads_the_cpu_flags(monkeypatch):
    assert cpu_has_fast_bf16("processor: 0\nflags : fpu sse avx2 avx512f avx512_bf16\n")
    assert cpu_has_fast_bf16("flags\t: fpu amx_bf16 amx_tile\n")
    assert not cpu_has_fast_bf16("flags : fpu sse avx2 avx512f\n")     # AVX-512 without BF16: emulated, slow
    import polyalign.models.loading as loading

    monkeypatch.delenv("POLYALIGN_DTYPE", raising=False)       # conftest pins float32 for the suite
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda cpuinfo=None: True)
    assert resolve_dtype(None) == resolve_dtype("auto") == "bfloat16"
    monkeypatch.setenv("POLYALIGN_DTYPE", "fp32")
    assert resolve_dtype(None) == "float32" and resolve_dtype("bf16") == "bfloat16"   # an explicit dtype wins
    monkeypatch.setenv("POLYALIGN_DTYPE", "float8")
    with pytest.raises(ModelError, match="unknown dtype"):
        resolve_dtype(None)
    monkeypatch.delenv("POLYALIGN_DTYPE")
    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda cpuinfo=None: False)
    assert resolve_dtype(None) == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype(None) == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype(None) == "float32"
    assert resolve_dtype("bf16") == "bfloat16" and resolve_dtype("float16") == "float16"
    with pytest.raises(ModelError, match="unknown dtype"):
        resolve_dtype("float8")


def test_device_policy_places_models_on_the_accelerator(monkeypatch):
    import polyalign.models.loading as loading

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == "cuda:0" and resolve_device("cpu") == "cpu"    # this rank's GPU (no launcher: 0)
    moved = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(a) or self)
    monkeypatch.setattr(loading, "default_dtype", lambda: "float32")
    load_model("builtin:tiny-random")
    assert ("cuda:0",) in moved
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == "cpu"
    with pytest.raises(ModelError, match="no CUDA device"):
        resolve_device("cuda")


def test_generation_ignores_the_models_own_sampling_defaults(tiny):
    """A generation_config with repetition_penalty must not leak into greedy evaluation."""
    from polyalign.eval.generation import GenerationSettings, HFGenerator

    model, tok = tiny
    gen = HFGenerator(model, tok, batch_size=4)
    texts = ["hello there", "how are you"]
    clean = gen.generate(texts, GenerationSettings(max_new_tokens=12))
    old = model.generation_config.repetition_penalty
    model.generation_config.repetition_penalty = 5.0
    try:
        assert gen.generate(texts, GenerationSettings(max_new_tokens=12)) == clean
        penalised = gen.generate(texts, GenerationSettings(max_new_tokens=12, repetition_penalty=5.0))
    finally:
        model.generation_config.repetition_penalty = old
    assert penalised != clean          # the setting itself works when asked for
    assert model.generation_config.repetition_penalty == old


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merged_adapter_generates_with_base_cost_in_the_base_dtype(dtype):
    """Evaluation folds the adapter in while generating: no LoRA module runs, and the merged weights
    keep the base dtype (an fp32 adapter on a bf16 base must not turn the weights fp32), so an
    adapter costs what the base costs (issue #17's 2.6x bf16 slowdown)."""
    from polyalign.eval.runner import merged_for_generation

    model = attach_lora(load_model("builtin:tiny-random", dtype=dtype), LoraSettings(r=4, alpha=8))
    calls = []
    for name, mod in model.named_modules():
        if name.endswith("lora_A.default"):
            mod.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randint(0, 100, (2, 8))
    model(input_ids=x)
    assert calls                                               # unmerged: LoRA runs in every layer
    calls.clear()
    before = {n: p.dtype for n, p in model.named_parameters() if "lora_" not in n}
    with torch.no_grad():
        for name, p in model.named_parameters():      # a non-zero adapter: merging changes the weights
            if "lora_B" in name:
                p.normal_(0, 0.05)
        with_lora = model(input_ids=x).logits
        with model.disable_adapter():
            without = model(input_ids=x).logits
    calls.clear()
    wrappers = sum(hasattr(m, "base_layer") for m in model.modules())
    with merged_for_generation(model):
        merged = model(input_ids=x).logits
        assert not calls
        # the PEFT wrappers are out of the tree (each decode step would call them in Python)
        assert not any(hasattr(m, "base_layer") for m in model.modules())
        # merged weights, in the base dtype (LoRA's own fp32 weights are no longer in the tree)
        assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
    assert set(before.values()) == {getattr(torch, dtype)}
    assert sum(hasattr(m, "base_layer") for m in model.modules()) == wrappers        # restored
    # the merged model computes the adapted model (bf16: up to the rounding of the merged weights)
    err, effect = (merged.float() - with_lora.float()).abs().max(), (without.float() - with_lora.float()).abs().max()
    assert err < (1e-4 if dtype == "float32" else 0.25 * effect), (err, effect)
    calls.clear()
    with torch.no_grad():
        again = model(input_ids=x).logits
    # afterwards: the adapter runs again on the base weights as they were, bit for bit (unmerging
    # alone rounds in bf16, and a sweep's shared base model would drift evaluation by evaluation)
    assert calls and torch.equal(again, with_lora)


def test_lm_head_sees_a_contiguous_input_when_generating():
    """Generation's first step feeds the head a strided ``hidden[:, -1:, :]``; with a frozen head (any
    adapter model) torch's CPU matmul then expands the [V, H] weight per row (8.7 GB at batch 32 for
    the 0.5B model). load_model's pre-hook makes the input contiguous first."""
    from polyalign.models.loading import contiguous_head_input

    model = load_model("builtin:tiny-random")
    for p in model.parameters():
        p.requires_grad_(False)
    seen = []
    head = model.get_output_embeddings()
    head.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous()))   # runs after ours
    contiguous_head_input(model)                                 # idempotent: still one hook of ours
    assert sum(1 for h in head._forward_pre_hooks.values() if h.__name__ == "hook") == 1
    ids = torch.randint(3, 100, (4, 6))
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert seen and all(seen)


def test_lm_head_input_of_one_row_gets_canonical_strides():
    """A [1, 1, H] slice of a [1, T, H] state is ``is_contiguous()`` yet keeps stride T x H, and torch's
    CPU matmul then copies the whole head weight (seen in the MSD step's one-row length groups): the
    pre-hook hands the head canonical strides, the same values, and leaves a canonical input alone."""
    from polyalign.models.loading import canonical_strides

    model = load_model("builtin:tiny-random")
    head = model.get_output_embeddings()
    seen = []
    head.register_forward_pre_hook(lambda mod, args: seen.append((args[0].stride(), args[0].data_ptr())))
    hidden = torch.randn(1, 7, head.in_features)
    one_row = hidden[:, -1:, :]
    assert one_row.is_contiguous() and one_row.stride() != canonical_strides(one_row.shape)
    with torch.no_grad():
        got = head(one_row)
        plain = torch.randn(3, 1, head.in_features)
        head(plain)
    assert seen[0][0] == canonical_strides((1, 1, head.in_features)) == (head.in_features,) * 2 + (1,)
    want = torch.nn.functional.linear(one_row.reshape(1, -1).double(), head.weight.double(),
                                      None if head.bias is None else head.bias.double())
    assert got.shape == (1, 1, head.out_features) and torch.allclose(got.reshape(1, -1).double(), want, atol=1e-5)
    assert seen[1][1] == plain.data_ptr()                        # already canonical: not copied
