"""Issue #26: the tokens every prompt of a batch starts with (a chat template's system turn) run once.

Each path that shares them (the packed training forwards, the student's kept prompt, evaluation's
``generate``) is checked against the same path with sharing off: float64 values and gradients to
1e-10, greedy tokens equal, a trainer's losses and adapter to fp32 tolerance.
"""

import pytest
import torch

from polyalign.models import LoraSettings, attach_lora, batching, load_model
from polyalign.models.batching import (
    packed_response_hidden,
    prefixed_response_hidden,
    prompt_prefix,
    shared_head_length,
)
from polyalign.models.chat import prompt_ids

SPEC = "builtin:tiny-random"
SYSTEM = "You are a careful assistant. Answer briefly, in the language of the question."
QUERIES = ["hi", "a much longer prompt " * 6, "ขอโทษ", "你好吗", "Habari yako leo?"]


def test_shared_head_length_counts_the_common_first_tokens(monkeypatch):
    seqs = [[1, 2, 3, 4, 5], [1, 2, 3, 9], [1, 2, 3, 4, 7, 7]]
    assert shared_head_length(seqs, minimum=1) == 3
    assert shared_head_length(seqs, minimum=4) == 0                          # too short to be worth a call
    assert shared_head_length([[1, 2, 3], [1, 2, 3, 4]], minimum=1) == 2      # each row keeps a token of its own
    assert shared_head_length([[1, 2, 3], [1, 2, 3, 4]], keep=2, minimum=1) == 1
    assert shared_head_length([[1, 2, 3, 4]], minimum=1) == 0                 # one row: nothing to share
    assert shared_head_length([[1, 2], [3, 4]], minimum=0) == 0
    monkeypatch.setenv("POLYALIGN_SHARE_HEAD", "0")
    assert shared_head_length(seqs, minimum=1) == 0


def float64_norms(model):
    """Qwen2's RMSNorm computes in float32 whatever its input, so a float64 model's gradients carry
    float32 rounding (~1e-7), which differs between summing rows before or after the norm's backward.
    For a float64 comparison the norms here compute in their input's dtype (same formula)."""
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            m.forward = (lambda x, m=m: m.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)
                                                                      + m.variance_epsilon)))
    return model


@pytest.fixture()
def lora64(tiny):
    _, tok = tiny
    torch.manual_seed(0)
    model = float64_norms(attach_lora(load_model(SPEC), LoraSettings(r=4, alpha=8)).double().train())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    prompts = [prompt_ids(tok, q, system=SYSTEM) for q in QUERIES]
    assert shared_head_length(prompts) >= 20                                     # the system turn is shared
    return model, tok, prompts


def _grads(model, out, probe):
    return torch.autograd.grad((out * probe).sum(), [p for p in model.parameters() if p.requires_grad])


def test_packed_forward_with_the_head_run_once_gives_the_same_states_and_gradients(lora64):
    model, tok, prompts = lora64
    responses = [[7, 8, 9], [10, 11], [], [12, 13, 14, 15], [16]]
    head = model.get_output_embeddings()
    probe = torch.randn(10, model.config.hidden_size, dtype=torch.float64)
    want = packed_response_hidden(model, prompts, responses, tok.pad_token_id, head, "cpu", share_head=False)
    got = packed_response_hidden(model, prompts, responses, tok.pad_token_id, head, "cpu", share_head=True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for g, w in zip(_grads(model, got, probe), _grads(model, want, probe), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_kept_prompt_with_the_head_run_once_gives_the_same_keys_values_and_gradients(lora64):
    model, tok, prompts = lora64
    responses = [[7, 8, 9], [10, 11], [3], [12, 13, 14, 15], [16]]
    head = model.get_output_embeddings()
    want_prefix = prompt_prefix(model, prompts, tok.pad_token_id, "cpu", share_head=False)
    got_prefix = prompt_prefix(model, prompts, tok.pad_token_id, "cpu", share_head=True)
    for want_row, got_row, p in zip(want_prefix, got_prefix, prompts, strict=True):
        for (wk, wv), (gk, gv) in zip(want_row, got_row, strict=True):
            assert gk.shape == wk.shape and gk.shape[2] == len(p) - 1            # no padding kept
            torch.testing.assert_close(gk, wk, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(gv, wv, rtol=1e-10, atol=1e-10)
    probe = torch.randn(11, model.config.hidden_size, dtype=torch.float64)
    want = prefixed_response_hidden(model, want_prefix, prompts, responses, head, "cpu")
    got = prefixed_response_hidden(model, got_prefix, prompts, responses, head, "cpu")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    grads = list(zip(_grads(model, got, probe), _grads(model, want, probe), strict=True))
    for g, w in grads:
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
    assert max(float(w.abs().max()) for _, w in grads) > 1e-3                      # a gradient to compare


@pytest.mark.parametrize("compact", [True, False])
def test_evaluation_generates_the_same_tokens_with_the_head_prefilled_once(tiny, monkeypatch, compact):
    """HFGenerator: the system turn prefilled once (one 1-row forward of the head, then the rows from
    its copy) gives the tokens of the plain left-padded batch, with ``generate`` and with the greedy
    loop that drops ended rows (``compact``)."""
    from polyalign.eval.generation import GenerationSettings, HFGenerator

    _, tok = tiny
    model = load_model(SPEC).double().eval()
    gen = HFGenerator(model, tok, batch_size=8, compact=compact)
    settings = GenerationSettings(max_new_tokens=10, system=SYSTEM)
    widths: list[tuple[int, int]] = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: widths.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
    got = gen.generate(QUERIES, settings)
    hook.remove()
    n = shared_head_length([prompt_ids(tok, q, system=SYSTEM) for q in QUERIES])
    monkeypatch.setenv("POLYALIGN_SHARE_HEAD", "0")
    want = gen.generate(QUERIES, settings)
    assert got == want and any(got)
    longest = max(len(prompt_ids(tok, q, system=SYSTEM)) for q in QUERIES)
    assert widths[0] == (1, n) and widths[1] == (len(QUERIES), longest - n)    # head once, then the rest


def test_msd_step_with_the_head_run_once_trains_as_without(tmp_path, monkeypatch):
    """Two fast MSD steps on the demo's shape, the prompts' common head shared or not: the same losses
    and adapter (fp32 tolerances), and the shared path taken (student prefix, student and teacher)."""
    from test_msd_speed import adapter, demo_like_trainer

    monkeypatch.setattr(batching, "SHARED_HEAD_MIN_TOKENS", 2)     # the tiny template's head is 6 tokens
    runs = {}
    for share in (False, True):
        trainer, model = demo_like_trainer(tmp_path / str(share), legacy=False)
        trainer.share_head = share
        calls: list[int] = []
        real = batching.shared_head_kv
        monkeypatch.setattr(batching, "shared_head_kv", lambda *a, c=calls, f=real, **k: c.append(1) or f(*a, **k))
        trainer.train()
        runs[share] = ([h["loss"] for h in trainer.state.log_history if "loss" in h], adapter(model), len(calls))
    (old_loss, old_w, old_calls), (new_loss, new_w, new_calls) = runs[False], runs[True]
    assert old_calls == 0 and new_calls == 2 * 2                   # 2 steps x (student's prompt, teacher)
    torch.testing.assert_close(torch.tensor(new_loss), torch.tensor(old_loss), rtol=1e-4, atol=1e-6)
    # Adam at lr 5e-2 moves an entry by ~lr whatever its gradient's size, so the fp32 rounding of a
    # near-zero gradient (the model's RMSNorm rounds to fp32 either way, summed in another order)
    # shows as ~1e-5 in a few entries; the float64 tests above hold the paths to 1e-10.
    for n in old_w:
        torch.testing.assert_close(new_w[n], old_w[n], rtol=1e-3, atol=1e-4 * max(1.0, float(old_w[n].abs().max())))


def test_benchmarks_compare_the_shared_head_on_the_tiny_model():
    """``msd_profile.py --share-head`` and ``eval_batch_size.py --share-head`` run both sides and print
    their ratios (on the tiny model, whose template's head is under the minimum: both sides compute
    alike, and say so)."""
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    out = subprocess.run([sys.executable, str(bench / "msd_profile.py"), "--model", SPEC, "--max-new-tokens", "4",
                          "--batch", "2", "--share-head", "1", "--no-warmup"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ratio msd_step_shared_head_vs_not" in out.stdout and "the same responses True" in out.stdout
    out = subprocess.run([sys.executable, str(bench / "eval_batch_size.py"), "--model", SPEC, "--sizes", "4",
                          "--share-head", "--limit", "2", "--repeats", "1", "--max-new-tokens", "4"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| 4 |")]
    assert len(rows) == 2 and rows[1].endswith("| 36/36 | 36/36 |") and "ratio eval_shared_head_vs_not" in out.stdout


def test_prompt_heads_script_counts_a_recipes_prompt_tokens():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "prompt_heads.py"
    out = subprocess.run([sys.executable, str(script), "--model", SPEC], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "384 training examples" in out.stdout and "student mean by language: zh" in out.stdout
    assert "shared head: 0 tokens" in out.stdout      # the tiny template's 6-token head is under the minimum
