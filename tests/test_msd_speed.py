"""Issue #26: the faster MSD step computes what the step before it did.

The fast step (the default on one process) runs student and teacher in length groups, sends only
the real response positions through the fused head, and samples with LoRA folded into one linear
layer per wrapped module. ``MSDTrainer.legacy_step = True`` is the step before; both are trained
here from the same seed and must give the same losses and the same adapter (fp32 tolerances that
hold on AVX2, AVX-512 and AMX machines).
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from polyalign.models import LoraSettings, attach_lora, load_model, load_tokenizer
from polyalign.models.batching import packed_response_hidden, response_batch, response_hidden
from polyalign.models.chat import prompt_ids
from polyalign.models.sampling import folded_lora, sampling_kwargs
from polyalign.train.msd_config import MSDConfig
from polyalign.train.msd_trainer import MSDTrainer, build_msd_examples
from polyalign.train.recipes import Recipe, load_prompts, training_arguments

ROOT = Path(__file__).resolve().parents[1]
SPEC = "builtin:tiny-random"
LR = 5e-2                                    # the demo-like trainer's learning rate (Adam)


def demo_like_trainer(tmp_path, legacy: bool, steps: int = 2, dtype: torch.dtype = torch.float32):
    """The demo recipe's shape on the tiny model: harmful + benign prompts in several languages,
    English-template teacher with hints, retain languages, DPSW, benign weight; batch 8."""
    torch.manual_seed(0)
    model = attach_lora(load_model(SPEC).to(dtype), LoraSettings(r=4, alpha=8))
    model.train()
    tok = load_tokenizer(SPEC)
    cfg = MSDConfig(mode="on_policy", student_languages=["zh", "th", "sw", "bn"], teacher_template="english_only",
                    language_hint=["zh", "th"], hint_prompts="all", harmful_hint="refuse", retain_languages=["sw"],
                    benign_target="english", benign_weight=3.0, max_new_tokens=12)
    recs = load_prompts("builtin:harmful", None, "train", 4, seed=0) + load_prompts("builtin:benign", None, "train", 4,
                                                                                  seed=0)
    r = Recipe(method="msd", model=SPEC, output_dir=str(tmp_path / ("legacy" if legacy else "fast")), seed=0,
               training={"max_steps": steps, "learning_rate": LR, "per_device_train_batch_size": 8,
                         "save_strategy": "no", "disable_tqdm": True})
    trainer = MSDTrainer(model, training_arguments(r), cfg, build_msd_examples(recs, cfg), tok)
    trainer.legacy_step = legacy
    return trainer, model


def adapter(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("share_prefill", [False, True])
def test_fast_step_trains_as_the_legacy_step(tmp_path, monkeypatch, share_prefill):
    """The legacy step against the fast one, with the student's prompt run twice (generate's prefill,
    then the training forward) or once (``share_prefill``: kept keys and values serve both)."""
    import polyalign.models.batching as batching
    import polyalign.train.msd_trainer as msd_trainer

    runs = {}
    for legacy in (True, False):
        trainer, model = demo_like_trainer(tmp_path, legacy)
        trainer.share_prefill = share_prefill
        calls: dict[str, list] = {"packed": [], "prefixed": [], "prefix": []}
        for mod, name, key in ((batching, "packed_response_hidden", "packed"),
                               (msd_trainer, "prefixed_response_hidden", "prefixed"),
                               (msd_trainer, "prompt_prefix", "prefix")):
            real = getattr(mod, name)
            monkeypatch.setattr(mod, name, lambda *a, c=calls[key], f=real, **k: c.append(1) or f(*a, **k))
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        runs[legacy] = (losses, adapter(model), {k: len(v) for k, v in calls.items()})
    (old_loss, old_w, old_calls), (new_loss, new_w, new_calls) = runs[True], runs[False]
    assert old_calls == {"packed": 0, "prefixed": 0, "prefix": 0}
    if share_prefill:                                          # 2 steps: the teacher packed, the student prefixed
        assert new_calls == {"packed": 2, "prefixed": 2, "prefix": 2}
    else:                                                      # 2 steps x (student, teacher)
        assert new_calls == {"packed": 4, "prefixed": 0, "prefix": 0}
    assert len(old_loss) == len(new_loss) == 2 and all(v > 0 for v in old_loss)
    torch.testing.assert_close(torch.tensor(new_loss), torch.tensor(old_loss), rtol=1e-4, atol=1e-6)
    moved = 0
    for n in old_w:
        # Adam divides each gradient by its running size, so an element whose two steps' gradients
        # nearly cancel moves by an amount fp32 rounding decides: 2.7e-5 for 1 of 512 elements on an
        # AMD EPYC Zen 5 (AVX-512), 2026-12-07; in float64 the two steps agree to 1e-14 (below).
        torch.testing.assert_close(new_w[n], old_w[n], rtol=1e-3, atol=1e-3 * LR)      # 1e-3 of Adam's lr
        moved += int(not torch.equal(old_w[n], torch.zeros_like(old_w[n])))
    assert moved                                                 # the adapter did train


def test_fast_step_trains_as_the_legacy_step_in_float64(tmp_path):
    """In float64 the fast step (shared prefill) and the legacy one train the same adapter to rounding
    (what the fp32 test's tolerance leaves to Adam's sensitivity to tiny gradients)."""
    weights = {}
    for legacy in (True, False):
        trainer, model = demo_like_trainer(tmp_path, legacy, dtype=torch.float64)
        trainer.share_prefill = True
        trainer.train()
        weights[legacy] = adapter(model)
    assert {w.dtype for w in weights[True].values()} == {torch.float64}
    for n in weights[True]:
        torch.testing.assert_close(weights[False][n], weights[True][n], rtol=0, atol=1e-10)
    assert any(not torch.equal(w, torch.zeros_like(w)) for w in weights[True].values())


def test_packed_hidden_states_are_the_padded_batchs_response_rows(tiny):
    model, tok = tiny
    prompts = [prompt_ids(tok, "hi"), prompt_ids(tok, "a much longer prompt " * 6), prompt_ids(tok, "ขอโทษ"), [5, 6]]
    responses = [[7, 8, 9], [10, 11], [], [12, 13, 14, 15]]
    head = model.get_output_embeddings()
    batch = response_batch(prompts, responses, tok.pad_token_id)
    with torch.no_grad():
        want = response_hidden(model, batch, head)[batch["response_mask"]]               # [9, H]
        got = packed_response_hidden(model, prompts, responses, tok.pad_token_id, head, "cpu", overhead=0)
    assert got.shape == want.shape == (9, model.config.hidden_size)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_packed_hidden_states_keep_the_graph(tiny):
    model, tok = tiny
    lora = attach_lora(load_model(SPEC), LoraSettings(r=4, alpha=8))
    prompts = [prompt_ids(tok, "hi"), prompt_ids(tok, "a much longer prompt " * 6)]
    h = packed_response_hidden(lora, prompts, [[7, 8], [9]], tok.pad_token_id, lora.get_output_embeddings(), "cpu",
                               overhead=0)
    h.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora.named_parameters() if "lora_" in n)
    empty = packed_response_hidden(lora, prompts, [[], []], tok.pad_token_id, lora.get_output_embeddings(), "cpu")
    assert empty.shape == (0, lora.config.hidden_size) and empty.requires_grad


@pytest.mark.parametrize("adapter_on", [True, False])
def test_folded_lora_samples_as_the_wrapped_model_and_leaves_the_base_bit_exact(tiny, adapter_on):
    _, tok = tiny
    torch.manual_seed(0)
    model = attach_lora(load_model(SPEC), LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)                                # a trained (non-zero) adapter
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    wrappers = {n: type(m) for n, m in model.named_modules()}
    ids = torch.tensor([prompt_ids(tok, "hello there")])
    kwargs = sampling_kwargs(6, 0.0, pad_token_id=tok.pad_token_id)
    model.eval()

    from peft.tuners.lora.layer import Linear as LoraLinear

    def logits_and_tokens(disable: bool):
        with torch.no_grad(), model.disable_adapter() if disable else torch.no_grad():
            return model(ids).logits, model.generate(input_ids=ids, **kwargs)

    want_logits, want_tokens = logits_and_tokens(disable=not adapter_on)
    with folded_lora(model, adapter=adapter_on):
        assert not any(isinstance(m, LoraLinear) for m in model.modules())
        got_logits, got_tokens = logits_and_tokens(disable=False)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-5)
    assert got_tokens.tolist() == want_tokens.tolist()
    assert {n: type(m) for n, m in model.named_modules()} == wrappers                    # wrappers back
    for n, p in model.named_parameters():
        assert torch.equal(p, base[n]), n                                                 # bit for bit


def test_folded_lora_swaps_the_wrappers_out_while_inside(tiny):
    model = attach_lora(load_model(SPEC), LoraSettings(r=4, alpha=8))
    from peft.tuners.lora.layer import Linear as LoraLinear

    n_wrapped = sum(isinstance(m, LoraLinear) for m in model.modules())
    assert n_wrapped
    with folded_lora(model):
        assert not any(isinstance(m, LoraLinear) for m in model.modules())
        assert sum(p.numel() for p in model.parameters()) > 0
    assert sum(isinstance(m, LoraLinear) for m in model.modules()) == n_wrapped
    plain = load_model(SPEC)
    with folded_lora(plain):                                                              # not PEFT: no-op
        pass


@pytest.mark.parametrize("draw", [None, "multinomial"])
def test_profile_script_prints_every_stage_on_the_tiny_model(draw):
    """The fast step draws as the recipe says (inverse_cdf), the legacy one as before (multinomial);
    given the legacy draw, the fast step samples the legacy step's very responses."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "msd_profile.py"), "--model", SPEC,
                          "--max-new-tokens", "8", "--batch", "4", "--compare", "1", "--no-warmup",
                          *(["--draw", draw] if draw else ["--ops", "3"])],
                         capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for row in ("sampling", "teacher forward", "student forward", "head + divergence", "backward", "optimizer",
                "step"):
        assert f"| {row} |" in text, (row, text)
    if draw is None:                     # --ops: the profiled step, every stage, its largest operators
        ops = text.split("under torch.profiler")[1]
        for stage in ("sampling", "teacher forward", "student forward", "backward", "optimizer"):
            assert f"| {stage} |" in ops and f"- {stage}: " in ops, (stage, ops)
        for line in ops.splitlines():          # the four kinds' shares of a stage add up to its operators' time
            if line.startswith("| ") and line.endswith("% |"):
                assert 97 <= sum(int(c.strip(" %")) for c in line.split("|")[4:-1]) <= 103, line
    assert "cpu:" in text and "flags:" in text and "padding" in text
    assert "ratio msd_step_legacy_vs_fast" in text
    assert f"draws: legacy multinomial, fast {draw or 'inverse_cdf'}" in text
    if draw == "multinomial":
        assert "responses identical: True" in text, text


def test_profile_script_compares_dtypes_on_the_tiny_model():
    """``--dtypes``: both trainers' stage tables, each base in its dtype, and the ratio line."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "msd_profile.py"), "--model", SPEC,
                          "--max-new-tokens", "4", "--batch", "2", "--dtypes", "1", "--no-warmup"],
                         capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "fast step, base in float32" in text and "fast step, base in bfloat16" in text
    assert text.count("| sampling |") == 2 and "ratio msd_step_bf16_vs_fp32" in text
    assert text.count("sampling floor: ") == 2 and "GB/s (1 GiB sum, best of 5)" in text


def test_sampling_floor_counts_each_base_weight_once_per_decode_step():
    """The floor: decode steps x the base's bytes (adapter weights left out: they are folded in) / bandwidth."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from msd_profile import sampling_floor

    net = torch.nn.Module()
    net.base = torch.nn.Linear(100, 10).to(torch.bfloat16)          # 1010 values, 2 bytes each
    net.lora_A = torch.nn.Linear(100, 4, bias=False)                # not read while decoding
    def floor_and_ratio(line: str) -> tuple[float, float]:
        return (float(re.search(r"= ([0-9.]+) s;", line).group(1)), float(re.search(r"\(([0-9.]+)x the floor", line).group(1)))

    line = sampling_floor(net, decode_steps=5, bandwidth=1e4, took=2.02)
    assert line.startswith("sampling floor: 5 decode steps x ")
    assert floor_and_ratio(line) == (pytest.approx(1.01, abs=0.005), pytest.approx(2.0, abs=0.005))
    # an untied input embedding is gathered, not read whole: left out; a tied one is the head, counted once
    model = load_model(SPEC)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    every = sum(p.numel() * p.element_size() for p in model.parameters())
    read = every - (0 if head is embed else embed.numel() * embed.element_size())
    floor, _ = floor_and_ratio(sampling_floor(model, decode_steps=5, bandwidth=1e4, took=1.0))
    assert floor == pytest.approx(5 * read / 1e4, abs=0.005)


def test_prompt_run_once_gives_the_packed_hidden_states_and_gradients_in_float64(tiny):
    """prompt_prefix + prefixed_response_hidden against packed_response_hidden: the same final hidden
    states and the same adapter gradient (through the kept keys and values), in float64 to 1e-10."""
    from polyalign.models.batching import prefixed_response_hidden, prompt_prefix

    _, tok = tiny
    torch.manual_seed(0)
    model = attach_lora(load_model(SPEC), LoraSettings(r=4, alpha=8)).double().train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    prompts = [prompt_ids(tok, "hi"), prompt_ids(tok, "a much longer prompt " * 6), prompt_ids(tok, "ขอโทษ"), [5, 6]]
    responses = [[7, 8, 9], [10, 11], [], [12, 13, 14, 15]]
    head, params = model.get_output_embeddings(), [p for p in model.parameters() if p.requires_grad]
    probe = torch.randn(9, model.config.hidden_size, dtype=torch.float64)
    want = packed_response_hidden(model, prompts, responses, tok.pad_token_id, head, "cpu")
    want_grads = torch.autograd.grad((want * probe).sum(), params)
    prefix = prompt_prefix(model, prompts, tok.pad_token_id, "cpu", overhead=0)
    got = prefixed_response_hidden(model, prefix, prompts, responses, head, "cpu", overhead=0)
    got_grads = torch.autograd.grad((got * probe).sum(), params)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
    assert max(float(w.abs().max()) for w in want_grads) > 1e-3                      # a gradient to compare


def test_generate_from_the_kept_prompt_keys_and_values_gives_the_prefilled_tokens(tiny):
    from polyalign.models.batching import cache_kwarg, left_pad, merged_prefix_cache, prompt_prefix

    model, tok = tiny
    prompts = [prompt_ids(tok, "hi"), prompt_ids(tok, "a much longer prompt " * 6), prompt_ids(tok, "ขอโทษ")]
    ids, mask, _ = left_pad(prompts, tok.pad_token_id)
    kwargs = sampling_kwargs(8, 0.0, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        cache, length = merged_prefix_cache(prompt_prefix(model, prompts, tok.pad_token_id, "cpu"), [0, 1, 2],
                                            detach=True)
        got = model.generate(input_ids=ids, attention_mask=mask, **{cache_kwarg(): cache}, **kwargs)
    assert length == ids.shape[1] - 1
    assert got.tolist() == want.tolist()


def test_prompt_is_not_shared_where_the_training_forward_keeps_no_cache(tiny):
    """Gradient checkpointing switches the training forward's KV cache off, and dropout would make the
    training pass differ from sampling's: the step then prefills as before, and prompt_prefix, asked
    anyway, raises instead of returning nothing."""
    from polyalign.models.batching import prompt_prefix, shares_prefill

    _, tok = tiny
    model = attach_lora(load_model(SPEC), LoraSettings(r=4, alpha=8))
    assert shares_prefill(model)
    model.gradient_checkpointing_enable()
    model.train()
    assert not shares_prefill(model)
    with pytest.raises(RuntimeError, match="no KV cache"):
        prompt_prefix(model, [prompt_ids(tok, "hi"), prompt_ids(tok, "hello there")], tok.pad_token_id, "cpu")
    assert not shares_prefill(attach_lora(load_model(SPEC), LoraSettings(r=4, alpha=8, dropout=0.1)))


def test_profile_operator_kinds():
    """``--ops`` sorts operators into matmul / attention / copies / the rest by name."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from msd_profile import KINDS, op_kind

    assert [op_kind(n) for n in ("aten::mm", "aten::addmm", "aten::mkldnn_linear", "aten::_scaled_dot_product_flash_attention_for_cpu",
                                 "aten::_to_copy", "aten::cat", "aten::mul", "aten::rsqrt", "aten::topk")] == \
        [KINDS[0]] * 3 + [KINDS[1], KINDS[2], KINDS[2]] + [KINDS[3]] * 3



def test_sampling_split_times_the_decode_steps_parts_on_the_tiny_model():
    """``benchmarks/sampling_split.py``: per-part timings inside generate only, the linear stand-ins by
    shape with their read floors, the LM head and the draw, and the cold-cache line."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sampling_split.py"), "--model", SPEC,
                          "--batch", "2", "--max-new-tokens", "4", "--steps", "1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    for part in ("decoder layers", "attention block", "MLP block", "norms", "attention kernel", "LM head", "draw"):
        assert part in rows, (part, text)
    assert any(k.startswith("linear ") for k in rows)
    steps = int(re.search(r"(\d+) decode steps", text).group(1))
    assert 1 <= steps <= 4
    # a decode step runs every layer once: as many decoder-layer calls as the tiny model has layers
    layers = load_model(SPEC).config.num_hidden_layers
    assert round(float(rows["decoder layers"].split("|")[4])) == layers
    assert "cold cache: the first norm" in text and "linear products:" in text


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor needs a C++ compiler")
def test_compiled_decode_benchmark_runs_on_the_tiny_model():
    """``benchmarks/compiled_decode.py``: transformers' compiled static-cache decoding against eager."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compiled_decode.py"), "--model", SPEC,
                          "--batch", "2", "--tokens", "3", "--repeats", "1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ratio decode_compiled_vs_eager" in out.stdout and "ratio decode_compiled_vs_ours" in out.stdout
    for side in ("eager", "ours", "compiled"):     # token agreement is printed, not asserted: rounding differs
        assert f"\n{side}: " in out.stdout and "the same tokens as eager: " in out.stdout
    assert "compilation included" in out.stdout
