"""MSDTrainer on builtin:tiny-random: frozen teacher, who samples, loss goes down, resume."""

import json

import pytest
import torch

from polyalign.models import LoraSettings, attach_lora, load_model, load_tokenizer
from polyalign.models.batching import left_pad, response_batch, response_logits
from polyalign.models.chat import prompt_ids
from polyalign.train.msd_config import MSDConfig
from polyalign.train.msd_trainer import MSDTrainer, build_msd_examples
from polyalign.train.recipes import DataSettings, Recipe, load_prompts, run_recipe, training_arguments

SPEC = "builtin:tiny-random"


def make_trainer(tmp_path, mode="on_policy", steps=4, lr=1e-2, **msd):
    model = attach_lora(load_model(SPEC), LoraSettings(r=4, alpha=8))
    model.train()
    tok = load_tokenizer(SPEC)
    cfg = MSDConfig(mode=mode, student_languages=["th", "sw"], max_new_tokens=8, **msd)
    examples = build_msd_examples(load_prompts("builtin:harmful", None, "train", 4), cfg)
    r = Recipe(method="msd", model=SPEC, output_dir=str(tmp_path / "out"),
               training={"max_steps": steps, "learning_rate": lr, "per_device_train_batch_size": 2})
    return MSDTrainer(model, training_arguments(r), cfg, examples, tok), model, tok


def test_config_validation():
    with pytest.raises(ValueError, match="mode"):
        MSDConfig(mode="sometimes")
    with pytest.raises(ValueError, match="teacher language en is also a student"):
        MSDConfig(student_languages=["en", "th"])
    with pytest.raises(ValueError, match="english_query"):
        MSDConfig(teacher_template="{target_query}")
    assert MSDConfig(student_languages=["SP"]).student_languages == ["es"]


def test_response_logits_match_unpadded_forward(tiny):
    model, tok = tiny
    prompts = [prompt_ids(tok, "hello there, how are you?"), prompt_ids(tok, "ขอโทษ")]
    responses = [[5, 6, 7], [8, 9, 10, 11, 12]]
    batch = response_batch(prompts, responses, tok.pad_token_id)
    with torch.no_grad():
        got = response_logits(model, batch)                   # [2, 5, V]
        for i, (p, r) in enumerate(zip(prompts, responses)):
            full = model(torch.tensor([p + r])).logits[0]     # unpadded reference
            want = full[len(p) - 1: len(p) + len(r) - 1]       # logits that predict each response token
            torch.testing.assert_close(got[i, -len(r):], want, atol=1e-5, rtol=1e-4)
    assert batch["response_mask"].tolist() == [[False, False, True, True, True], [True] * 5]


def test_examples_pair_target_with_english():
    cfg = MSDConfig(student_languages=["th", "jv"])
    ex = build_msd_examples(load_prompts("builtin:harmful", None, "train", 2), cfg)
    assert len(ex) == 4 and {e["lang"] for e in ex} == {"th", "jv"}
    assert all(e["english"].isascii() and not e["query"].isascii() for e in ex if e["lang"] == "th")


def test_teacher_is_frozen_base_and_lora_trains(tmp_path):
    trainer, model, _ = make_trainer(tmp_path)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    trainer.train()
    for n, p in model.named_parameters():
        if "lora_" in n:
            continue
        assert torch.equal(p, base[n]), f"base weight {n} changed"
    assert any(not torch.equal(p, lora[n]) for n, p in model.named_parameters() if "lora_B" in n)
    # the teacher context computes the untouched base model
    ids = torch.tensor([[1, 2, 3, 4]])
    ref = load_model(SPEC)
    with torch.no_grad(), trainer.teacher_context(model) as teacher:
        torch.testing.assert_close(teacher(ids).logits, ref(ids).logits)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("mode", ["on_policy", "off_policy"])
def test_sampler_is_student_or_teacher(tmp_path, mode):
    trainer, model, tok = make_trainer(tmp_path, mode=mode, temperature=1e-4)   # ~greedy
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)                  # student now differs from teacher
    prompts = [prompt_ids(tok, "How do I bake bread?"), prompt_ids(tok, "Piye carane gawe roti?")]
    got = trainer.sample_responses(model, prompts, from_teacher=(mode == "off_policy"))
    ids, mask, _ = left_pad(prompts, tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        student = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        with model.disable_adapter():
            teacher = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    expect = (student if mode == "on_policy" else teacher)[:, ids.shape[1]:].tolist()
    other = (teacher if mode == "on_policy" else student)[:, ids.shape[1]:].tolist()
    assert [g == e[: len(g)] for g, e in zip(got, expect)] == [True, True]
    assert other != expect


def test_few_steps_lower_the_loss_on_a_fixed_batch(tmp_path):
    trainer, model, tok = make_trainer(tmp_path, mode="off_policy", steps=12, lr=3e-2)
    ex = trainer.train_dataset[:4]
    torch.manual_seed(0)
    s_prompts, t_prompts = trainer._prompts(ex)
    responses = trainer.sample_responses(model, t_prompts, from_teacher=True)

    def fixed_loss():
        from polyalign.losses import msd_loss

        s = response_batch(s_prompts, responses, tok.pad_token_id)
        t = response_batch(t_prompts, responses, tok.pad_token_id)
        with torch.no_grad():
            student_logits = response_logits(model, s)
            with trainer.teacher_context(model) as teacher:
                teacher_logits = response_logits(teacher, t)
        return float(msd_loss(student_logits, teacher_logits, s["response_mask"]))
    before = fixed_loss()
    trainer.train()
    assert fixed_loss() < before * 0.9


def test_resume_reproduces_the_next_loss(tmp_path):
    def recipe(steps):
        return Recipe(method="msd", model=SPEC, output_dir=str(tmp_path / "run"),
                      data=DataSettings(source="builtin:harmful", limit=6),
                      msd={"student_languages": ["th", "sw"], "max_new_tokens": 6}, lora={"r": 4, "alpha": 8},
                      training={"max_steps": steps, "learning_rate": 1e-2, "per_device_train_batch_size": 2,
                                "save_steps": 2})
    full = run_recipe(recipe(4))
    losses = [h["loss"] for h in json.loads((full / "log_history.json").read_text()) if "loss" in h]
    import shutil

    for ckpt in ("checkpoint-4",):
        shutil.rmtree(tmp_path / "run" / ckpt)               # as if killed after step 2's checkpoint
    resumed = run_recipe(recipe(4), resume=True)
    again = [h["loss"] for h in json.loads((resumed / "log_history.json").read_text()) if "loss" in h]
    assert again[-2:] == pytest.approx(losses[-2:], rel=1e-5)


def test_benign_retain_uses_the_student_context_for_the_teacher(tmp_path):
    trainer, model, tok = make_trainer(tmp_path, benign_retain=True)
    recs = load_prompts("builtin:all", None, "train", None)
    ex = build_msd_examples([r for r in recs if r.category == "benign"][:1] + [r for r in recs if r.category == "harmful"][:1],
                            trainer.msd)
    assert [e["retain"] for e in ex] == [True, True, False, False]
    student, teacher = trainer._prompts(ex)
    assert teacher[0] == student[0] and teacher[2] != student[2]
    off = MSDConfig(student_languages=["th", "sw"])
    assert not any(e["retain"] for e in build_msd_examples(recs[:3], off))


def test_english_only_teacher_sees_the_english_query_alone(tmp_path):
    from polyalign.train.msd_config import ENGLISH_ONLY_TEMPLATE

    trainer, _, tok = make_trainer(tmp_path, teacher_template=ENGLISH_ONLY_TEMPLATE)
    rec = load_prompts("builtin:harmful", None, "train", 1)[0]
    ex = build_msd_examples([rec], trainer.msd)
    _, teacher = trainer._prompts(ex)
    assert teacher[0] == prompt_ids(tok, rec.texts["en"])
    assert teacher[0] != prompt_ids(tok, rec.texts["th"])
