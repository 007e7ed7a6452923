"""Fused LM head + MSD divergence: same loss and gradients as the full-logit path, without [N, V] saved."""

import pytest
import torch

from polyalign.losses.msd import (
    fused_token_divergence,
    mean_over_valid,
    msd_loss,
    normalize_weights,
    reduce_sequences,
)
from polyalign.models import LoraSettings, attach_lora, load_model, load_tokenizer
from polyalign.models.batching import response_batch, response_hidden, response_logits
from polyalign.models.chat import prompt_ids
from polyalign.train import msd_trainer as trainer_mod
from polyalign.train.msd_config import MSDConfig
from polyalign.train.msd_trainer import MSDTrainer, build_msd_examples
from polyalign.train.recipes import Recipe, load_prompts, training_arguments

KINDS = ["reverse_kl", "forward_kl", "jsd"]
MASK = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)   # padding + empty row


def problem(dtype=torch.float64, B=3, T=5, H=8, V=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    h_s, h_t = (torch.randn(B, T, H, generator=g) for _ in range(2))
    weight, bias = torch.randn(V, H, generator=g) * 0.8, torch.randn(V, generator=g) * 0.5
    return [x.to(dtype) for x in (h_s, h_t, weight, bias)]


def fused_loss(h_s, h_t, weight, bias, mask, kind, dpsw, top_k=8, chunk=4, **kw):
    """msd_loss on the fused path: same normalisation and reductions as MSDTrainer.compute_loss."""
    d, raw = fused_token_divergence(h_s, h_t, weight, bias, kind, 0.5, top_k, chunk=chunk, **kw)
    w = normalize_weights(raw, mask) if dpsw else mask.to(d.dtype)
    per_seq, valid = reduce_sequences(d, w, mask)
    return mean_over_valid(per_seq, valid, h_s)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dpsw", [True, False])
def test_fused_equals_unfused_loss_and_hidden_gradient(kind, dpsw):
    h_s, h_t, weight, bias = problem()
    h1, h2 = h_s.clone().requires_grad_(), h_s.clone().requires_grad_()
    want = msd_loss(h1 @ weight.T + bias, h_t @ weight.T + bias, MASK, kind=kind, dpsw=dpsw, top_k=8)
    got = fused_loss(h2, h_t, weight, bias, MASK, kind, dpsw)          # 15 rows in chunks of 4
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-10, atol=1e-14)
    assert h1.grad.abs().sum() > 0 and torch.all(h2.grad[2] == 0)    # the empty row gets nothing


@pytest.mark.parametrize("kind", KINDS)
def test_trained_head_and_separate_teacher_head_recompute_in_backward(kind):
    """Full fine-tuning: the head weight and bias get gradients (recomputed per chunk in backward),
    equal to the full-logit path's; a separate frozen teacher head gets none."""
    h_s, h_t, weight, bias = problem(seed=3)
    t_weight, t_bias = weight + 0.1 * torch.randn_like(weight), bias.flip(0)
    leaves = [[x.clone().requires_grad_() for x in (h_s, weight, bias)] for _ in range(2)]
    (h1, w1, b1), (h2, w2, b2) = leaves
    t_w2 = t_weight.clone().requires_grad_()
    want = msd_loss(h1 @ w1.T + b1, h_t @ t_weight.T + t_bias, MASK, kind=kind, top_k=8)
    got = fused_loss(h2, h_t, w2, b2, MASK, kind, True, teacher_weight=t_w2, teacher_bias=t_bias)
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    for a, b in zip((h1, w1, b1), (h2, w2, b2)):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-14)
    assert t_w2.grad is None


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_fused(kind):
    h_s, h_t, weight, bias = problem(B=2, T=3, H=4, V=7, seed=1)
    w = torch.rand(2, 3, dtype=torch.float64)
    h = h_s.requires_grad_()
    # fast path: gradient w.r.t. h saved from the forward
    assert torch.autograd.gradcheck(lambda x: (fused_token_divergence(x, h_t, weight, bias, kind, 0.3, 4, chunk=2)[0]
                                               * w).sum(), (h,))
    # trained head, teacher's a frozen copy: everything recomputed in backward
    W, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y, z: (fused_token_divergence(
        x, h_t, y, z, kind, 0.3, 4, teacher_weight=weight, teacher_bias=bias, chunk=2)[0] * w).sum(), (h, W, b))


def test_bf16_inputs_match_float64_reference():
    """bf16 hidden states and head: logits in bf16 (as the model's head), D and weights in fp32 inside."""
    h_s, h_t, weight, bias = problem(torch.bfloat16, B=2, T=8, H=64, V=1000, seed=2)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, :3] = False
    h = h_s.clone().requires_grad_()
    ref_h = h_s.double().requires_grad_()
    ref = msd_loss(ref_h @ weight.double().T + bias.double(), h_t.double() @ weight.double().T + bias.double(),
                   mask, top_k=32)
    got = fused_loss(h, h_t, weight, bias, mask, "reverse_kl", True, top_k=32, chunk=5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=0)
    ref.backward()
    got.backward()
    assert h.grad.dtype == torch.bfloat16
    assert (h.grad.double() - ref_h.grad).norm() <= 5e-2 * ref_h.grad.norm()


def saved_shapes(fn):
    """Shapes of every tensor autograd saves for backward while ``fn`` runs."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def test_only_the_hidden_gradient_is_saved_for_backward():
    B, T, H, V = 2, 6, 8, 300
    h_s, h_t, weight, bias = problem(torch.float32, B=B, T=T, H=H, V=V)
    mask = torch.ones(B, T, dtype=torch.bool)
    h = h_s.requires_grad_()
    fused = saved_shapes(lambda: fused_loss(h, h_t, weight, bias, mask, "reverse_kl", True, chunk=4).backward())
    assert max(torch.Size(s).numel() for s in fused) <= B * T * H                 # nothing vocabulary-sized
    assert (B * T, H) in fused
    unfused = saved_shapes(lambda: msd_loss(h @ weight.T + bias, h_t @ weight.T + bias, mask).backward())
    assert (B * T, V) in unfused                                                   # the hook does see [N, V]


# ---------------------------------------------------------------- the trainer on builtin:tiny-random
SPEC = "builtin:tiny-random"


def make_trainer(tmp_path, lora=True, **msd):
    torch.manual_seed(0)
    model = load_model(SPEC)
    if lora:
        model = attach_lora(model, LoraSettings(r=4, alpha=8))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.5)                  # the student differs from the teacher
    model.train()
    tok = load_tokenizer(SPEC)
    cfg = MSDConfig(student_languages=["th", "sw"], max_new_tokens=8, **msd)
    examples = build_msd_examples(load_prompts("builtin:harmful", None, "train", 2), cfg)
    r = Recipe(method="msd", model=SPEC, output_dir=str(tmp_path / "out"),
               training={"max_steps": 1, "learning_rate": 1e-2, "per_device_train_batch_size": 4})
    trainer = MSDTrainer(model, training_arguments(r), cfg, examples, tok)
    # fixed responses of different lengths (left-padded response window, one empty), so both paths see one batch
    trainer.sample_responses = lambda *a, **k: [[5, 6, 7], [8, 9, 10, 11, 12, 13], [], [14, 15]]
    return trainer, model


def loss_and_grads(trainer, model, fused, monkeypatch):
    trainer.msd.fused_lm_head = fused
    if fused:                                   # the fused path never builds [B, R, V] logits
        monkeypatch.setattr(trainer_mod, "response_logits", lambda *a: pytest.fail("full logits on the fused path"))
    else:
        monkeypatch.undo()
    model.zero_grad()
    loss = trainer.compute_loss(model, {"examples": trainer.train_dataset[:4]})
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["reverse_kl", "jsd"])
def test_trainer_fused_step_equals_unfused_lora(tmp_path, monkeypatch, kind):
    trainer, model = make_trainer(tmp_path, divergence=kind)
    fused, g_fused = loss_and_grads(trainer, model, True, monkeypatch)
    full, g_full = loss_and_grads(trainer, model, False, monkeypatch)
    assert full > 0
    torch.testing.assert_close(fused, full, rtol=1e-5, atol=1e-7)
    assert set(g_fused) == set(g_full) and all("lora_" in n for n in g_full)
    for n in g_full:                    # fp32: elementwise to 1e-4 of the tensor's largest entry
        torch.testing.assert_close(g_fused[n], g_full[n], rtol=1e-4, atol=1e-4 * float(g_full[n].abs().max()))


def test_trainer_fused_step_equals_unfused_full_finetuning(tmp_path, monkeypatch):
    """No adapter: the frozen teacher is a copy (its own head) and the tied head trains (recompute path)."""
    trainer, model = make_trainer(tmp_path, lora=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))                        # the student moves off the teacher
    fused, g_fused = loss_and_grads(trainer, model, True, monkeypatch)
    full, g_full = loss_and_grads(trainer, model, False, monkeypatch)
    torch.testing.assert_close(fused, full, rtol=1e-5, atol=1e-7)
    assert "model.embed_tokens.weight" in g_full and set(g_fused) == set(g_full)
    for n in g_full:                    # fp32: elementwise to 1e-4 of the tensor's largest entry
        torch.testing.assert_close(g_fused[n], g_full[n], rtol=1e-4, atol=1e-4 * float(g_full[n].abs().max()))


def test_response_hidden_through_the_head_is_response_logits(tiny):
    model, tok = tiny
    prompts = [prompt_ids(tok, "hello there"), prompt_ids(tok, "ขอโทษ")]
    batch = response_batch(prompts, [[5, 6, 7], [8, 9, 10, 11]], tok.pad_token_id)
    head = model.get_output_embeddings()
    with torch.no_grad():
        h = response_hidden(model, batch, head)                              # [2, 4, H]
        torch.testing.assert_close(head(h), response_logits(model, batch), rtol=1e-5, atol=1e-6)
        wrong = torch.nn.Linear(head.in_features, head.out_features, bias=False)
        wrong.weight.copy_(head.weight * 2)                                  # e.g. a scaled head
        with pytest.raises(ValueError, match="fused_lm_head"):
            response_hidden(model, batch, wrong)


def test_capped_or_adapted_heads_fall_back_to_full_logits(tmp_path):
    trainer, model = make_trainer(tmp_path)
    assert trainer._linear_head(model) is model.get_output_embeddings()
    model.config.final_logit_softcapping = 30.0
    assert trainer._linear_head(model) is None
    model.config.final_logit_softcapping = None
    lora_head = attach_lora(load_model(SPEC), LoraSettings(r=4, alpha=8, target_modules=["lm_head"]))
    assert trainer._linear_head(lora_head) is None
