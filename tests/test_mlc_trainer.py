"""MLC plugged into TRL's DPOTrainer and SFTTrainer on builtin:tiny-random."""

import json

import pytest
import torch

from polyalign.losses import mlc_loss
from polyalign.models.adapters import load_heads
from polyalign.train.mlc_config import MLCConfig
from polyalign.train.mlc_trainer import prompt_representations
from polyalign.train.recipes import (
    DataSettings,
    Recipe,
    build_model,
    load_prompts,
    run_recipe,
    training_arguments,
)

DPO_FILE = "mlc_pku/pku_saferlhf_multilingual_dpo.jsonl"
SOURCES = {"dpo": DPO_FILE, "simpo": DPO_FILE, "orpo": DPO_FILE, "sft": "mlc_pku/pku_saferlhf_multilingual_sft.json"}
PARADIGMS = ["dpo", "simpo", "orpo", "sft"]


def recipe(shared, tmp_path, paradigm, weight=0.8, steps=4, lr=1e-2, every=1):
    return Recipe(method="mlc", model="builtin:tiny-random", output_dir=str(tmp_path / paradigm),
                  data=DataSettings(source=str(shared / SOURCES[paradigm]), split="all", limit=4),
                  mlc={"paradigm": paradigm, "languages": ["en", "zh", "sw"], "dim": 32, "max_length": 384,
                       "weight": weight, "every": every},
                  lora={"r": 4, "alpha": 8},
                  training={"max_steps": steps, "learning_rate": lr, "per_device_train_batch_size": 4,
                            "save_steps": 100})


def losses(final):
    return [h["loss"] for h in json.loads((final / "log_history.json").read_text()) if "loss" in h]


def test_config_validation():
    with pytest.raises(ValueError, match="paradigm"):
        MLCConfig(paradigm="ppo")
    with pytest.raises(ValueError, match="two languages"):
        MLCConfig(languages=["en"])
    assert MLCConfig().weight == 0.8 and MLCConfig().every == 2 and MLCConfig().tau == 0.2
    assert MLCConfig(paradigm="simpo").beta == 2.0 and MLCConfig(paradigm="orpo").beta == 0.1
    assert MLCConfig(paradigm="simpo", beta=2.5).beta == 2.5


def reference_loss(logits, inputs, paradigm):
    """SimPO / ORPO from full float64 logits with an explicit loop over sequences and tokens: an
    implementation independent of TRL's fused LM head and of polyalign's trainer."""
    from polyalign.losses.preference import orpo_loss, simpo_loss

    logits = logits.double()
    logps, lens = [], []
    for i in range(len(inputs["input_ids"])):
        total, n = 0.0, 0
        for t in range(1, inputs["input_ids"].shape[1]):
            if inputs["completion_mask"][i, t]:
                total += float(torch.log_softmax(logits[i, t - 1], -1)[inputs["input_ids"][i, t]])
                n += 1
        logps.append(total)
        lens.append(n)
    lp, ln = torch.tensor(logps, dtype=torch.float64), torch.tensor(lens, dtype=torch.float64)
    cfg = MLCConfig(paradigm=paradigm)
    if paradigm == "simpo":
        return float(simpo_loss(*lp.chunk(2), *ln.chunk(2), cfg.beta, cfg.simpo_gamma))
    return float(orpo_loss(*lp.chunk(2), *ln.chunk(2), cfg.beta))


@pytest.mark.parametrize("paradigm", PARADIGMS)
def test_lambda_zero_reproduces_plain_trl(shared, tmp_path, paradigm):
    """weight 0: the MLC trainer's losses equal the trainer without MLC on the same data, seed and
    steps (TRL's own DPOTrainer / SFTTrainer). SimPO/ORPO have no stable TRL trainer, so there the
    first step's loss is also checked against :func:`reference_loss` on the initial weights."""
    import dataclasses

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from polyalign.train.mlc_trainer import mlc_rows
    from polyalign.train.preference_trainer import reference_free_trainer_class

    r = recipe(shared, tmp_path, paradigm, weight=0.0, steps=3)
    ours = losses(run_recipe(r))
    from transformers import set_seed

    set_seed(r.seed)                                        # same LoRA init as run_recipe
    model, tok = build_model(r)
    rows = [{k: v for k, v in row.items() if k != "mlc_prompt_ids"}
            for row in mlc_rows(load_prompts(r.data.source, None, "all", 4), MLCConfig(**r.mlc), tok)]
    args = training_arguments(Recipe(**{**dataclasses.asdict(r), "output_dir": str(tmp_path / "plain")}))
    base = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
    if paradigm == "dpo":
        trainer = DPOTrainer(model=model, args=DPOConfig(**base, beta=0.1, max_length=384),
                             train_dataset=Dataset.from_list(rows), processing_class=tok)
    elif paradigm in ("simpo", "orpo"):
        beta = MLCConfig(paradigm=paradigm).beta
        trainer = reference_free_trainer_class()(
            model=model, args=DPOConfig(**base, beta=beta, max_length=384, precompute_ref_log_probs=True),
            train_dataset=Dataset.from_list(rows), processing_class=tok, preference_loss=paradigm, beta=beta,
            gamma=1.0)
    else:
        trainer = SFTTrainer(model=model, args=SFTConfig(**base, max_length=384, completion_only_loss=True),
                             train_dataset=Dataset.from_list(rows), processing_class=tok)
    if paradigm in ("simpo", "orpo"):
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])   # step 1 = all rows
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert ours[0] == pytest.approx(reference_loss(logits, batch, paradigm), abs=2e-4)   # logs keep 4 digits
    trainer.train()
    plain = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert ours == pytest.approx(plain, rel=1e-6)


@pytest.mark.parametrize("paradigm", PARADIGMS)
def test_steps_lower_alignment_loss_and_mlc(shared, tmp_path, paradigm):
    from polyalign.train.mlc_trainer import build_mlc_trainer

    r = recipe(shared, tmp_path, paradigm, steps=10, lr=2e-2)
    model, tok = build_model(r)
    records = load_prompts(r.data.source, None, "all", 4)
    trainer = build_mlc_trainer(r, model, tok, records, training_arguments(r))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])

    with torch.no_grad():
        model.eval()
        raw_before = float(mlc_loss(prompt_representations(
            model, torch.nn.Identity(), {k: v for k, v in batch.items() if k.startswith("mlc_")}, None)))
        model.train()

    def measure():
        model.eval()
        with torch.no_grad():
            inputs = dict(batch)
            mlc_inputs = {k: inputs.pop(k) for k in list(inputs) if k.startswith("mlc_")}
            align = float(trainer.compute_loss(model, inputs))   # eval mode: alignment loss only
            reps = prompt_representations(model, trainer.mlc_head, mlc_inputs, None)
            out = align, float(mlc_loss(reps))
        model.train()
        return out
    import copy

    head_before = copy.deepcopy(trainer.mlc_head)
    align0, mlc0 = measure()
    trainer.train()
    align1, mlc1 = measure()
    assert align1 < align0 and mlc1 < mlc0, (align0, align1, mlc0, mlc1)
    assert not torch.equal(head_before.proj.weight, trainer.mlc_head.proj.weight)   # the head is trained
    # The trained head's bias alone could make every representation collinear. Through the
    # *initial* head (and with no head at all) the model's own states must have moved together.
    model.eval()
    with torch.no_grad():
        mlc_inputs = {k: v for k, v in batch.items() if k.startswith("mlc_")}
        fixed = float(mlc_loss(prompt_representations(model, head_before, mlc_inputs, None)))
        raw = float(mlc_loss(prompt_representations(model, torch.nn.Identity(), mlc_inputs, None)))
    model.train()
    assert fixed < mlc0, (mlc0, fixed)
    assert raw < raw_before, (raw_before, raw)


def test_head_saved_and_loaded_with_checkpoint(shared, tmp_path):
    r = recipe(shared, tmp_path, "dpo", steps=2)
    r.training["save_steps"] = 2
    final = run_recipe(r)
    from polyalign.losses import MLCHead

    head = MLCHead(64, 32)
    load_heads(final, {"mlc_head": head})
    from safetensors.torch import load_file

    from polyalign.train.mlc_trainer import MLCHeadCheckpoint

    ckpt_head = load_file(tmp_path / "dpo" / "checkpoint-2" / "mlc_head.safetensors")
    assert torch.equal(head.proj.weight, ckpt_head["proj.weight"])
    # --resume: the callback puts the checkpoint's head back into a freshly initialised one
    fresh = MLCHead(64, 32)
    args = training_arguments(r)
    MLCHeadCheckpoint(fresh).on_train_begin(args, type("S", (), {"global_step": 2})(), None)
    assert torch.equal(fresh.proj.weight, ckpt_head["proj.weight"])
    assert not torch.equal(head.proj.weight, MLCHead(64, 32).proj.weight)
    log = json.loads((final / "log_history.json").read_text())
    assert any("mlc/loss" in h and "mlc/top_singular_share" in h and "mlc/pairwise_cosine" in h for h in log)


@pytest.mark.parametrize("paradigm", ["simpo", "orpo"])
def test_reference_free_loss_matches_full_logits_reference(shared, tmp_path, paradigm):
    """SimPO/ORPO through TRL's fused LM head equal the formula on full float64 log-softmax logits,
    and full fine-tuning loads no reference copy."""
    from polyalign.train.mlc_trainer import build_mlc_trainer

    r = recipe(shared, tmp_path, paradigm)
    r.lora = None
    model, tok = build_model(r)
    trainer = build_mlc_trainer(r, model, tok, load_prompts(r.data.source, None, "all", 4), training_arguments(r))
    assert trainer.ref_model is None
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    inputs = {k: v for k, v in batch.items() if not k.startswith("mlc_")}
    model.eval()
    with torch.no_grad():
        ours = float(trainer.compute_loss(model, dict(inputs)))
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.double()
    assert ours == pytest.approx(reference_loss(logits, inputs, paradigm), rel=1e-4)


def test_probe_reports_similarity_before_and_after(shared, tmp_path):
    """Identical text in every language is exactly collinear; a trained adapter changes the figures."""
    from rich.console import Console

    from polyalign.data.records import ParallelRecord, write_records
    from polyalign.eval.probe import run_probe

    same = tmp_path / "same.jsonl"
    write_records(same, [ParallelRecord(id=str(i), texts={lang: f"How do I do thing {i}?" for lang in ("en", "zh", "sw")})
                         for i in range(3)])
    rows = run_probe("builtin:tiny-random", None, str(same), "en,zh,sw", 8, None, Console(quiet=True))
    assert rows["base"]["pairwise_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert rows["base"]["top_singular_share"] == pytest.approx(1.0, abs=1e-5)

    final = run_recipe(recipe(shared, tmp_path, "dpo", steps=3, lr=5e-2))
    out = tmp_path / "probe.json"
    rows = run_probe("builtin:tiny-random", str(final), "builtin:harmful", "en,zh,sw", 6, None,
                     Console(quiet=True), str(out))
    saved = json.loads(out.read_text())
    assert saved["prompts"] == 6 and set(saved["base"]["cosine_to_en"]) == {"zh", "sw"}
    assert saved["base"]["pairwise_cosine"] != saved["adapter"]["pairwise_cosine"]
    # cos(lang, en) is the mean over prompts of the cosine of last-token states: recompute it directly
    from polyalign.data.builtin import load_prompts
    from polyalign.eval.probe import representations
    from polyalign.models import load_model, load_tokenizer

    recs = [r for r in load_prompts("builtin:harmful", None, "all", None) if all(x in r.texts for x in ("en", "zh", "sw"))][:6]
    reps = representations(load_model("builtin:tiny-random"), load_tokenizer("builtin:tiny-random"),
                           [[r.texts[x] for x in ("en", "zh", "sw")] for r in recs])
    direct = torch.nn.functional.cosine_similarity(reps[:, 2].double(), reps[:, 0].double(), dim=-1).mean()
    assert saved["base"]["cosine_to_en"]["sw"] == pytest.approx(float(direct), abs=1e-6)

    half = tmp_path / "half.jsonl"                  # zh identical to en, sw not: exactly 1 vs below 1
    write_records(half, [ParallelRecord(id=str(i), texts={"en": f"How do I do thing {i}?", "zh": f"How do I do thing {i}?",
                                                          "sw": f"Ninafanyaje kitu {i}?"}) for i in range(3)])
    rows = run_probe("builtin:tiny-random", None, str(half), "en,zh,sw", 8, None, Console(quiet=True))
    assert rows["base"]["cosine_to_en"]["zh"] == pytest.approx(1.0, abs=1e-6)
    assert rows["base"]["cosine_to_en"]["sw"] < 0.999


def test_make_responses_turns_prompts_into_sft_mlc_data(tmp_path):
    """Prompts only -> the model's own English answers in MLC's SFT format -> an SFT+MLC trainer;
    a rerun reuses every cached generation."""
    from polyalign.data.loaders import load_mlc_pku
    from polyalign.data.records import ParallelRecord, write_records
    from polyalign.eval.generation import GenerationCache
    from polyalign.train.make_responses import make_responses
    from polyalign.train.mlc_trainer import build_mlc_trainer

    src = tmp_path / "prompts.jsonl"
    texts = [{"en": f"How do I bake bread number {i}?", "zh": f"我如何烤面包 {i}?", "sw": f"Ninaokaje mkate {i}?"}
             for i in range(3)]
    write_records(src, [ParallelRecord(id=f"p{i}", texts=t) for i, t in enumerate(texts)])
    out = tmp_path / "sft.json"
    assert make_responses(str(src), out, "builtin:tiny-random", max_new_tokens=6) == 3
    rows = json.loads(out.read_text())
    assert [r["instruction"] for r in rows] == [t["en"] for t in texts]
    assert [r["prompt_sw"] for r in rows] == [t["sw"] for t in texts]
    cache = GenerationCache(tmp_path / "sft.json.cache.jsonl")
    by_prompt = {row["prompt"]: row["response"] for row in cache.rows.values()}
    assert [r["output"] for r in rows] == [by_prompt[t["en"]] for t in texts]   # each answer to its own prompt

    before = (tmp_path / "sft.json.cache.jsonl").read_text()
    make_responses(str(src), out, "builtin:tiny-random", max_new_tokens=6)
    assert (tmp_path / "sft.json.cache.jsonl").read_text() == before           # nothing generated twice

    records = load_mlc_pku(out)
    assert records[0].meta["output"] == rows[0]["output"] and set(records[0].texts) == {"en", "zh", "sw"}
    r = Recipe(method="mlc", model="builtin:tiny-random", output_dir=str(tmp_path / "run"),
               data=DataSettings(source=str(out), split="all"),
               mlc={"paradigm": "sft", "languages": ["en", "zh", "sw"], "dim": 16}, lora={"r": 4, "alpha": 8},
               training={"max_steps": 1, "per_device_train_batch_size": 3})
    model, tok = build_model(r)
    trainer = build_mlc_trainer(r, model, tok, records, training_arguments(r))
    assert len(trainer.train_dataset) == 3


def test_length_buckets_are_optimal_partitions():
    """Against brute force over every way to cut the sorted rows into contiguous groups."""
    import itertools
    import random

    from polyalign.models.batching import length_buckets

    def cost(groups, lengths, overhead):
        return sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)

    rng = random.Random(0)
    for _ in range(40):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 8))]
        overhead = rng.choice([0, 32, 500])
        groups = length_buckets(lengths, overhead)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        best = min(cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))], lengths, overhead)
                   for k in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), k))
        assert cost(groups, lengths, overhead) == best


def test_bucketed_representations_equal_one_padded_forward():
    from polyalign.losses import MLCHead
    from polyalign.models import load_model
    from polyalign.models.batching import last_token_hidden, left_pad

    model = load_model("builtin:tiny-random")
    torch.manual_seed(0)
    seqs = [torch.randint(5, 200, (n,)).tolist() for n in (3, 40, 5, 38, 4, 90)]     # B=2, L=3
    ids, mask, pos = left_pad(seqs, 0)
    head = MLCHead(model.config.hidden_size, 16, seed=1)
    inputs = {"mlc_input_ids": ids, "mlc_attention_mask": mask, "mlc_position_ids": pos,
              "mlc_num_languages": torch.tensor(3)}
    reps = prompt_representations(model, head, inputs, None)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    expect = head(last_token_hidden(out.hidden_states[-1], mask)).view(2, 3, -1)
    assert torch.allclose(reps, expect, atol=1e-5)
    mlc_loss(reps).backward()
    assert head.proj.weight.grad is not None and model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("paradigm", ["sft", "dpo"])
def test_mlc_term_is_scaled_like_the_base_loss_under_accumulation(shared, tmp_path, paradigm):
    """Official schedule (every 2) with 2 accumulation steps: one optimizer step's gradient on the head
    (which only L_MLC reaches) is that of lambda x the mean L_MLC over the window, for SFT (whose TRL
    loss is normalised over the whole window) as for DPO (a per-micro-batch mean)."""
    from polyalign.train.mlc_trainer import build_mlc_trainer

    r = recipe(shared, tmp_path, paradigm, every=2)
    r.training.update(per_device_train_batch_size=2, gradient_accumulation_steps=2)
    model, tok = build_model(r)
    trainer = build_mlc_trainer(r, model, tok, load_prompts(r.data.source, None, "all", 4), training_arguments(r))
    batches = [trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in idx]))
               for idx in ((0, 1), (2, 3))]
    n_items = trainer._get_num_items_in_batch(batches, torch.device("cpu"))
    trainer.current_gradient_accumulation_steps = 2          # as the training loop sets it
    assert trainer.mlc_term.active(trainer.state.global_step)  # step 0: the MLC term is on
    model.train()
    head = trainer.mlc_head.proj.weight
    for b in batches:
        trainer.training_step(model, dict(b), n_items)
    got = head.grad.clone()
    head.grad = None
    mlcs = [mlc_loss(prompt_representations(model, trainer.mlc_head, {k: v for k, v in b.items() if k.startswith("mlc_")},
                                            None)) for b in batches]
    (0.8 * sum(mlcs) / 2).backward()
    torch.testing.assert_close(got, head.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("paradigm", ["dpo", "sft"])
def test_benign_pairs_add_benign_prompts_with_a_helpful_chosen_answer(tmp_path, paradigm):
    """MLC's PKU data has no benign prompts: benign_pairs adds builtin:benign rows whose chosen answer is
    the model's own English answer (cached) and whose rejected answer is a refusal."""
    from polyalign.data.records import ParallelRecord
    from polyalign.train.make_responses import own_english_answers
    from polyalign.train.mlc_config import BENIGN_REFUSAL
    from polyalign.train.mlc_trainer import build_mlc_trainer

    langs = ["en", "zh", "sw"]
    harmful = [ParallelRecord(f"h{i}", {c: f"how to hurt {i} ({c})" for c in langs}, "harmful",
                              {"chosen": "No.", "rejected": "Sure.", "output": "No."}) for i in range(2)]
    benign = load_prompts("builtin:benign", None, "train", 2)

    def trainer(pairs):
        r = Recipe(method="mlc", model="builtin:tiny-random", output_dir=str(tmp_path / f"{paradigm}{pairs}"),
                   mlc={"paradigm": paradigm, "languages": langs, "dim": 16, "benign_pairs": pairs,
                        "benign_max_new_tokens": 6},
                   lora={"r": 4, "alpha": 8}, training={"max_steps": 1, "per_device_train_batch_size": 4})
        model, tok = build_model(r)
        return build_mlc_trainer(r, model, tok, harmful + benign, training_arguments(r)), model, tok, r
    off, *_ = trainer(False)
    assert len(off.train_dataset) == 2                                  # benign records were skipped
    on, model, tok, r = trainer(True)
    assert len(on.train_dataset) == 4
    own = own_english_answers(model, tok, benign, tmp_path / "check.jsonl", 6)
    rows = [on.train_dataset[i] for i in (2, 3)]
    if paradigm == "dpo":
        assert [row["chosen"][-1]["content"] for row in rows] == [own[b.id] for b in benign]
        assert {row["rejected"][-1]["content"] for row in rows} == {BENIGN_REFUSAL}
    else:
        assert [row["completion"][-1]["content"] for row in rows] == [own[b.id] for b in benign]
    assert (tmp_path / f"{paradigm}True" / "benign_answers.jsonl").exists()
    on.train()                                                          # a step runs on the mixed batch
    assert any("mlc/loss" in h for h in on.state.log_history)
    with pytest.raises(Exception, match="benign_pairs: no benign records"):
        r2 = Recipe(**{**r.__dict__, "output_dir": str(tmp_path / "none")})
        build_mlc_trainer(r2, model, tok, harmful, training_arguments(r2))


def test_dpo_full_finetuning_reference_is_loaded_by_polyalign_frozen_in_the_recipe_dtype(shared, tmp_path):
    """Full fine-tuning DPO: the reference is the model loaded again through polyalign (a built-in model
    has no hub path for TRL to reload), frozen, in the recipe's dtype, equal to the starting weights;
    then two steps move the policy and leave the reference where it was."""
    from polyalign.train.mlc_trainer import build_mlc_trainer

    r = recipe(shared, tmp_path, "dpo", steps=2)
    r.lora, r.dtype = None, "bfloat16"
    model, tok = build_model(r)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = build_mlc_trainer(r, model, tok, load_prompts(r.data.source, None, "all", 4), training_arguments(r))
    ref = trainer.ref_model
    assert ref is not None and ref is not model and not any(p.requires_grad for p in ref.parameters())
    assert {p.dtype for p in ref.parameters()} == {torch.bfloat16}
    for n, p in ref.named_parameters():
        torch.testing.assert_close(p.float(), start[n].float(), rtol=0, atol=1e-2 * float(start[n].abs().max()) + 1e-6)
    trainer.train()
    moved = [n for n, p in model.named_parameters() if n in start and not torch.equal(p.detach(), start[n])]
    assert moved
    for n, p in ref.named_parameters():
        torch.testing.assert_close(p.float(), start[n].float(), rtol=0, atol=1e-2 * float(start[n].abs().max()) + 1e-6)
