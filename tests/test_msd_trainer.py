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


def make_trainer(tmp_path, mode="on_policy", steps=4, lr=1e-2, records=None, mlc_config=None, batch=2, **msd):
    model = attach_lora(load_model(SPEC), LoraSettings(r=4, alpha=8))
    model.train()
    tok = load_tokenizer(SPEC)
    cfg = MSDConfig(mode=mode, student_languages=msd.pop("student_languages", ["th", "sw"]), max_new_tokens=8, **msd)
    examples = build_msd_examples(records or load_prompts("builtin:harmful", None, "train", 4), cfg)
    r = Recipe(method="msd", model=SPEC, output_dir=str(tmp_path / "out"),
               training={"max_steps": steps, "learning_rate": lr, "per_device_train_batch_size": batch})
    return MSDTrainer(model, training_arguments(r), cfg, examples, tok, mlc_config=mlc_config), model, tok


def mixed_records(n: int = 2):
    """n harmful then n benign train prompts of the built-in benchmark."""
    recs = load_prompts("builtin:all", None, "train", None)
    return [r for r in recs if r.category == "harmful"][:n] + [r for r in recs if r.category == "benign"][:n]


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
    trainer, model, tok = make_trainer(tmp_path, mode="off_policy", steps=20, lr=3e-2)
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
    resolved = json.loads((full / "polyalign_checkpoint.json").read_text())["resolved"]["msd"]
    assert resolved["draw"] == "inverse_cdf" and resolved["student_languages"] == ["th", "sw"]   # defaults recorded
    import shutil

    for ckpt in ("checkpoint-4",):
        shutil.rmtree(tmp_path / "run" / ckpt)               # as if killed after step 2's checkpoint
    resumed = run_recipe(recipe(4), resume=True)
    again = [h["loss"] for h in json.loads((resumed / "log_history.json").read_text()) if "loss" in h]
    assert again[-2:] == pytest.approx(losses[-2:], rel=1e-5)


def test_resume_at_max_steps_loads_the_checkpoint_and_takes_no_step(tmp_path):
    # A sweep point shortened to a step it already checkpointed (trained to 4 with save_steps 2, now
    # max_steps 2): Trainer resumed from checkpoint-2 took a 3rd step; the checkpoint is the result.
    import shutil

    from safetensors.torch import load_file

    def recipe(steps):
        return Recipe(method="msd", model=SPEC, output_dir=str(tmp_path / "run"),
                      data=DataSettings(source="builtin:harmful", limit=12),
                      msd={"student_languages": ["th"], "max_new_tokens": 4}, lora={"r": 4, "alpha": 8},
                      training={"max_steps": steps, "learning_rate": 1e-2, "per_device_train_batch_size": 2,
                                "save_steps": 2})
    full = run_recipe(recipe(4))
    want = load_file(str(tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors"))
    shutil.rmtree(full)
    shutil.rmtree(tmp_path / "run" / "checkpoint-4")
    resumed = run_recipe(recipe(2), resume=True)
    got = load_file(str(resumed / "adapter_model.safetensors"))
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert max(h["step"] for h in json.loads((resumed / "log_history.json").read_text())) == 2


def test_benign_targets_choose_the_teacher_context(tmp_path):
    from polyalign.train.msd_config import TEACHER_TEMPLATE

    recs = mixed_records(1)
    trainer, model, tok = make_trainer(tmp_path, records=recs, benign_target="retain")
    ex = trainer.train_dataset
    assert [(e["benign"], e["lang"]) for e in ex] == [(False, "th"), (False, "sw"), (True, "th"), (True, "sw")]
    student, teacher = trainer._prompts(ex)
    assert teacher[2] == student[2] and teacher[0] != student[0]            # retain: the student's own context
    trainer.msd.benign_target = "english"
    _, teacher = trainer._prompts(ex)
    assert teacher[2] == prompt_ids(tok, recs[1].texts["en"])                 # the English query alone
    assert teacher[0] == prompt_ids(tok, TEACHER_TEMPLATE.format(target_query=recs[0].texts["th"],
                                                                 english_query=recs[0].texts["en"]))
    with pytest.warns(FutureWarning, match="benign_retain"):
        assert MSDConfig(benign_retain=True).benign_target == "retain"
    with pytest.raises(ValueError, match="benign_target"):
        MSDConfig(benign_target="nobody")


def test_benign_languages_widen_only_the_benign_prompts():
    recs = mixed_records(2)
    cfg = MSDConfig(student_languages=["th"], benign_languages=["th", "SW", "jv"])
    ex = build_msd_examples(recs, cfg)
    assert {e["lang"] for e in ex if not e["benign"]} == {"th"}           # harmful: the student languages
    assert sorted(e["lang"] for e in ex if e["benign"]) == ["jv", "jv", "sw", "sw", "th", "th"]
    assert all(set(e["texts"]) == {"en", "th"} for e in ex)               # MLC term: teacher + student languages
    assert len(build_msd_examples(recs, MSDConfig(student_languages=["th"]))) == 4
    with pytest.raises(ValueError, match="teacher language"):
        MSDConfig(student_languages=["th"], benign_languages=["en", "sw"])


def test_benign_weight_scales_the_benign_term_and_logs_it_apart(tmp_path):
    """benign_target english is nonzero at initialisation (retain is exactly 0); benign_weight 0 vs 1
    changes the loss; loss/harmful and loss/benign are logged."""
    trainer, model, tok = make_trainer(tmp_path, records=mixed_records(1), benign_target="english", batch=4)
    batch = {"examples": list(trainer.train_dataset)}

    def loss(**change):
        for k, v in change.items():
            setattr(trainer.msd, k, v)
        torch.manual_seed(0)
        trainer._metrics.clear()
        return float(trainer.compute_loss(model, batch))
    full, none = loss(benign_weight=1.0), loss(benign_weight=0.0)
    assert none < full and none == pytest.approx(loss(benign_weight=0.0))
    logs = {"loss": none}
    loss(benign_weight=1.0)
    trainer.log(logs)
    assert logs["loss/benign"] > 0 and logs["loss/harmful"] > 0
    # the harmful term alone, over all 4 rows: the benign rows still count in the denominator
    assert none == pytest.approx(logs["loss/harmful"] * 2 / 4, rel=1e-4)
    loss(benign_target="retain", benign_weight=1.0)
    trainer.log(logs := {"loss": 0.0})
    assert logs["loss/benign"] == pytest.approx(0.0, abs=1e-6)                # retain: no signal at the start


def test_language_hint_asks_the_teacher_for_the_query_language(tmp_path):
    trainer, model, tok = make_trainer(tmp_path, records=mixed_records(1), language_hint=True, batch=4)
    ex = trainer.train_dataset
    assert all("\n\nAnswer in " in trainer.teacher_text(e) for e in ex)
    assert trainer.teacher_text(ex[0]).endswith("Answer in Thai.") and trainer.teacher_text(ex[1]).endswith("Swahili.")
    hinted = trainer._prompts(ex)[1]
    trainer.msd.language_hint = False
    assert all(a != b for a, b in zip(hinted, trainer._prompts(ex)[1]))
    torch.manual_seed(0)
    trainer.compute_loss(model, {"examples": list(ex)})
    trainer.log(logs := {"loss": 0.0})
    assert {"fidelity/th", "fidelity/sw"} <= set(logs)                          # measured every step


def test_hint_on_benign_prompts_only_and_retain_languages(tmp_path):
    trainer, model, tok = make_trainer(tmp_path, records=mixed_records(1), language_hint=["th", "sw"],
                                       hint_prompts="benign", benign_target="english", retain_languages=["SW"],
                                       teacher_template="english_only", batch=4)
    ex = list(trainer.train_dataset)
    by = {(e["lang"], e["benign"]): e for e in ex}
    assert len(by) == 4
    # harmful prompts: the English query alone, no hint (the teacher's English refusal)
    assert trainer.teacher_text(by["th", False]) == by["th", False]["english"]
    assert trainer.teacher_text(by["th", True]).endswith("Answer in Thai.")
    student, teacher = trainer._prompts(ex)
    for e, s_ids, t_ids in zip(ex, student, teacher):
        # sw (a retain language), harmful and benign: the frozen model in the student's own context;
        # th: a teacher context
        assert (s_ids == t_ids) == (e["lang"] == "sw"), (e["lang"], e["benign"])
    # retain gives the sw benign row exactly zero divergence at the start
    torch.manual_seed(0)
    trainer.compute_loss(model, {"examples": [by["sw", True]]})
    trainer.log(logs := {"loss": 0.0})
    assert logs["loss/benign"] == pytest.approx(0.0, abs=1e-6)
    assert MSDConfig(language_hint=True, hint_prompts="harmful").hints("th", benign=False)
    assert not MSDConfig(language_hint=True, hint_prompts="harmful").hints("th", benign=True)
    with pytest.raises(ValueError, match="hint_prompts"):
        MSDConfig(hint_prompts="some")


def test_harmful_hint_asks_for_a_refusal_in_the_query_language(tmp_path):
    trainer, *_ = make_trainer(tmp_path, records=mixed_records(1), language_hint=["th"], harmful_hint="refuse",
                               benign_target="english", teacher_template="english_only", batch=4)
    by = {(e["lang"], e["benign"]): e for e in trainer.train_dataset}
    harmful_th = trainer.teacher_text(by["th", False])
    assert harmful_th.startswith(by["th", False]["english"])
    assert harmful_th.endswith("Refuse it briefly and politely. Answer in Thai.")
    # benign prompts keep the plain hint; a language the hint does not cover gets neither
    assert trainer.teacher_text(by["th", True]).endswith("\n\nAnswer in Thai.")
    assert trainer.teacher_text(by["sw", False]) == by["sw", False]["english"]
    # hint_prompts still decides which prompts are hinted at all
    trainer.msd.hint_prompts = "benign"
    assert trainer.teacher_text(by["th", False]) == by["th", False]["english"]
    own = MSDConfig(language_hint=True, harmful_hint=" Say no, in {target_language}.")
    assert own.hint_text(benign=False) == " Say no, in {target_language}." and own.hint_text(benign=True) != own.harmful_hint
    with pytest.raises(ValueError, match="harmful_hint"):
        MSDConfig(harmful_hint="Refuse in {language}.")


def test_language_hint_for_listed_languages_only(tmp_path):
    trainer, *_ = make_trainer(tmp_path, records=mixed_records(1), language_hint=["TH"], batch=4)
    ex = trainer.train_dataset
    th = [e for e in ex if e["lang"] == "th"]
    sw = [e for e in ex if e["lang"] == "sw"]
    assert th and sw
    assert all(trainer.teacher_text(e).endswith("Answer in Thai.") for e in th)
    assert not any("Answer in" in trainer.teacher_text(e) for e in sw)      # sw: the teacher's English answer
    assert MSDConfig(language_hint=True).hints("sw") and not MSDConfig().hints("sw")
    with pytest.raises(ValueError, match="language_hint"):
        MSDConfig(language_hint="th")


def test_teacher_gating_keeps_harmful_refused_and_benign_answered(tmp_path, monkeypatch):
    """Stubbed teacher: refuses the first harmful and the first benign prompt, answers the others."""
    recs = mixed_records(2)
    refuse = {recs[0].texts["en"], recs[2].texts["en"]}
    calls = []

    def fake_sample(self, model, prompts, from_teacher, greedy=False, max_new_tokens=None):
        assert from_teacher and greedy and max_new_tokens == 32
        calls.append(len(prompts))
        texts = [tok.decode(p) for p in prompts]
        answers = ["I'm sorry, but I can't help with that." if any(q in t for q in refuse) else "Sure: first, ..."
                   for t in texts]
        return [tok.encode(a, add_special_tokens=False) for a in answers]
    tok = load_tokenizer(SPEC)
    monkeypatch.setattr(MSDTrainer, "sample_responses", fake_sample)
    trainer, _, _ = make_trainer(tmp_path, records=recs, student_languages=["th"], teacher_gating=True,
                                 benign_target="english")
    kept = [(e["prompt_id"], e["benign"]) for e in trainer.train_dataset]
    assert kept == [(recs[0].id, False), (recs[3].id, True)]
    assert trainer._once == {"gate/th/kept": 2.0, "gate/th/dropped_harmful_answered": 1.0,
                             "gate/th/dropped_benign_refused": 1.0}
    assert sum(calls) == 4 and (tmp_path / "out" / "teacher_gate.json").exists()
    trainer2, _, _ = make_trainer(tmp_path, records=recs, student_languages=["th"], teacher_gating=True,
                                  benign_target="english")
    assert sum(calls) == 4 and len(trainer2.train_dataset) == 2                # answers read from the cache
    trainer2.log(logs := {"loss": 1.0})
    assert logs["gate/th/kept"] == 2.0


def test_msd_mlc_logs_the_mlc_loss_and_lowers_it(tmp_path):
    """MSD + lambda x MLC over the batch's prompts (harmful and benign, en + every student language)."""
    from polyalign.losses import mlc_loss
    from polyalign.train.mlc_config import MLCConfig
    from polyalign.train.mlc_term import prompt_representations

    mlc = MLCConfig(languages=["en", "th", "sw"], weight=1.0, every=1, dim=16)
    trainer, model, tok = make_trainer(tmp_path, records=mixed_records(2), mlc_config=mlc, steps=8, lr=2e-2, batch=4)
    assert model.mlc_head is trainer.mlc_term.head
    inputs = trainer._mlc_inputs(list(trainer.train_dataset))
    assert inputs["mlc_input_ids"].shape[0] == 4 * 3                          # 4 prompts x (en, th, sw)

    def measure():
        with torch.no_grad():
            return float(mlc_loss(prompt_representations(model, trainer.mlc_term.head, inputs, None)))
    head = trainer.mlc_term.head.proj.weight.detach().clone()
    before = measure()
    trainer.train()
    assert measure() < before
    assert not torch.equal(head, trainer.mlc_term.head.proj.weight)
    assert any("mlc/loss" in h and "loss/benign" in h for h in trainer.state.log_history)


def test_english_only_teacher_sees_the_english_query_alone(tmp_path):
    from polyalign.train.msd_config import ENGLISH_ONLY_TEMPLATE

    trainer, _, tok = make_trainer(tmp_path, teacher_template=ENGLISH_ONLY_TEMPLATE)
    rec = load_prompts("builtin:harmful", None, "train", 1)[0]
    ex = build_msd_examples([rec], trainer.msd)
    _, teacher = trainer._prompts(ex)
    assert teacher[0] == prompt_ids(tok, rec.texts["en"])
    assert teacher[0] != prompt_ids(tok, rec.texts["th"])


def test_sampling_ignores_the_models_generation_config(tmp_path):
    """y ~ q as configured: a checkpoint's repetition penalty / top_k / no-repeat-ngram must not
    reach training-time sampling (they did: only temperature and top_p were overridden)."""
    trainer, model, tok = make_trainer(tmp_path)
    prompts = [prompt_ids(tok, "How do I bake bread?"), prompt_ids(tok, "Piye carane gawe roti?")]

    def sample():
        torch.manual_seed(0)
        return trainer.sample_responses(model, prompts, from_teacher=False)
    clean = sample()
    gc = model.generation_config
    gc.repetition_penalty, gc.top_k, gc.no_repeat_ngram_size, gc.min_p = 1.3, 3, 1, 0.2
    assert sample() == clean
    # the settings above do change what generate() samples when they are not overridden
    ids, mask, _ = left_pad(prompts, tok.pad_token_id)
    torch.manual_seed(0)
    raw = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=True, temperature=1.0,
                         top_p=1.0, top_k=None, pad_token_id=tok.pad_token_id)[:, ids.shape[1]:].tolist()
    assert [r[: len(c)] for r, c in zip(raw, clean)] != clean


def test_teacher_probe_counts_in_language_refusals(capsys):
    from polyalign.train.teacher_probe import probe

    out = probe(SPEC, ["th", "zh"], 2, max_new_tokens=4, templates=["english-only", "english-only+refuse"])
    assert set(out) == {"english-only", "english-only+refuse"}
    for row in out.values():
        assert row["n_per_category"] == 4
        assert row["harmful_refused_in_language"] <= min(row["harmful_refused"], row["in_language"])
    assert "in the query's language" in capsys.readouterr().out


def test_a_model_built_and_passed_in_trains_as_run_recipe_builds_it(tmp_path):
    """The demo builds the policy itself after an evaluation has used the RNG: the adapter's random
    init was then unseeded, and the demo's model differed from the study's same-seed point."""
    from safetensors.torch import load_file

    from polyalign.train.recipes import build_model

    def recipe(out):
        return Recipe(method="msd", model=SPEC, output_dir=str(tmp_path / out),
                      data=DataSettings(source="builtin:harmful", limit=4),
                      msd={"student_languages": ["th"], "max_new_tokens": 4}, lora={"r": 4, "alpha": 8},
                      training={"max_steps": 2, "learning_rate": 1e-2, "per_device_train_batch_size": 2})
    own = load_file(str(run_recipe(recipe("own")) / "adapter_model.safetensors"))
    torch.manual_seed(1234)
    torch.rand(1000)                                        # whatever ran before
    model, tok = build_model(recipe("passed"))
    passed = load_file(str(run_recipe(recipe("passed"), model=model, tokenizer=tok) / "adapter_model.safetensors"))
    assert own.keys() == passed.keys() and all(torch.equal(own[k], passed[k]) for k in own)
