"""MLC as a plug-in: a mixin that adds ``lambda * L_MLC`` to any TRL / transformers trainer.

    class MLCDPOTrainer(MLCMixin, DPOTrainer): ...      # TRL's stable DPOTrainer, unchanged
    class MLCSFTTrainer(MLCMixin, SFTTrainer): ...
    class MLCPreferenceTrainer(MLCMixin, ReferenceFreePreferenceTrainer): ...   # SimPO / ORPO

The multilingual prompt variants of each example travel through the collator as
``mlc_input_ids`` / ``mlc_attention_mask`` ([B * L, T], language-major within each example);
``compute_loss`` adds the MLC term (hidden state of layer k at the last prompt token -> MLC head
-> :func:`mlc_loss`) on every ``every``-th optimizer step, and ``log`` reports L_MLC, the top
singular-value share and the mean pairwise cosine between languages.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from polyalign.data.records import BENIGN_CATEGORIES, ParallelRecord, record_label, require_labels
from polyalign.models.chat import prompt_ids
from polyalign.text.refusal import refusal_phrase
from polyalign.train.mlc_config import MLCConfig
from polyalign.train.mlc_term import (
    HEAD_FILE,
    MLCHeadCheckpoint,
    MLCTerm,
    accumulation_scale,
    prompt_representations,
    variant_inputs,
)
from polyalign.train.preference_trainer import reference_free_trainer_class

log = logging.getLogger(__name__)

__all__ = ["HEAD_FILE", "MLCCollator", "MLCMixin", "build_mlc_trainer", "mlc_rows", "prompt_representations"]


class MLCCollator:
    """Wraps the trainer's own collator; pads each example's L prompt variants next to the batch."""

    def __init__(self, base: Any, pad_token_id: int):
        self.base, self.pad_token_id = base, pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        variants = [ids for ex in examples for ids in ex["mlc_prompt_ids"]]      # B * L prompts
        n_lang = len(examples[0]["mlc_prompt_ids"])
        batch = self.base([{k: v for k, v in ex.items() if k != "mlc_prompt_ids"} for ex in examples])
        batch.update(variant_inputs(variants, n_lang, self.pad_token_id))
        return batch


class MLCMixin:
    """Adds the MLC term to ``super().compute_loss``. Put it first in the bases."""

    def setup_mlc(self, mlc_config: MLCConfig, hidden_size: int) -> None:
        self.mlc = mlc_config
        self.mlc_term = MLCTerm(mlc_config, self.model, hidden_size, self.args.seed, self.args.device)
        self.mlc_head = self.mlc_term.head
        self.add_callback(MLCHeadCheckpoint(self.mlc_term.head, self))
        self.data_collator = MLCCollator(self.data_collator, self.processing_class.pad_token_id)

    def _set_signature_columns_if_needed(self):
        # Keep the prompt-variant column when the trainer drops columns the model does not take.
        super()._set_signature_columns_if_needed()
        if "mlc_prompt_ids" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "mlc_prompt_ids"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mlc_inputs = {k: inputs.pop(k) for k in list(inputs) if k.startswith("mlc_")}
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        loss = result[0] if return_outputs else result
        if model.training and self.mlc_term.active(self.state.global_step):
            # Scaled like the base loss under gradient accumulation (TRL's SFT loss is normalised
            # over the whole window; without this lambda was effectively weight x steps).
            loss = loss + self.mlc_term(self.accelerator.unwrap_model(model), mlc_inputs,
                                        accumulation_scale(self, num_items_in_batch))
        elif model.training and self.accelerator.num_processes > 1:
            # DDP reduces every parameter every step: on steps without the MLC term the head joins
            # with an exactly-zero gradient (single-process runs skip this, as the official code does).
            loss = loss + self.mlc_term.zero()
        return (loss, result[1]) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:                       # every rank, every logging step: the means are over all ranks
            self.mlc_term.flush(logs, self.accelerator)
        super().log(logs, start_time)


def _trl_classes():
    from trl import DPOTrainer, SFTTrainer

    class MLCDPOTrainer(MLCMixin, DPOTrainer):
        """TRL's DPOTrainer + MLC."""

    class MLCSFTTrainer(MLCMixin, SFTTrainer):
        """TRL's SFTTrainer + MLC."""

    class MLCPreferenceTrainer(MLCMixin, reference_free_trainer_class()):
        """SimPO / ORPO on TRL's DPOTrainer pipeline + MLC."""

    return MLCDPOTrainer, MLCSFTTrainer, MLCPreferenceTrainer


def mlc_rows(records: list[ParallelRecord], cfg: MLCConfig, tokenizer: Any,
             benign_answers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows for TRL (conversational prompt/chosen/rejected or prompt/completion) + ``mlc_prompt_ids``.

    Records need an English prompt, the English response(s) in ``meta`` (``chosen``/``rejected`` for
    DPO, ``output`` for SFT) and the prompt in every language of ``cfg.languages``. With
    ``cfg.benign_pairs``, benign records get chosen = their helpful answer (``benign_answers[id]``
    for ``benign_chosen: own``, else ``meta``) and rejected = ``cfg.benign_rejected``.
    """
    rows: list[dict[str, Any]] = []
    refused: list[str] = []
    if cfg.benign_pairs or cfg.harmful_pairs:
        require_labels(records, "mlc.benign_pairs / mlc.harmful_pairs")
    for r in records:
        if any(lang not in r.texts for lang in cfg.languages):
            continue
        meta = r.meta
        if cfg.harmful_pairs and record_label(r) == "harmful" and not (
                "output" in meta if cfg.paradigm == "sft" else "chosen" in meta and "rejected" in meta):
            answer = (benign_answers or {}).get(r.id)
            if not answer:
                continue
            if cfg.harmful_skip_refused and refusal_phrase(answer, "en"):
                refused.append(r.id)            # refusal over refusal: no preference to learn
                continue
            meta = {"output": cfg.harmful_chosen, "chosen": cfg.harmful_chosen, "rejected": answer}
        if cfg.benign_pairs and r.category in BENIGN_CATEGORIES:
            answer = (benign_answers or {}).get(r.id) if cfg.benign_chosen == "own" else \
                meta.get("output", meta.get("chosen"))
            if not answer:
                continue
            meta = {"output": answer, "chosen": answer, "rejected": cfg.benign_rejected}
        row: dict[str, Any] = {"prompt": [{"role": "user", "content": r.texts["en"]}],
                               "mlc_prompt_ids": [prompt_ids(tokenizer, r.texts[lang], max_tokens=cfg.max_length)
                                                  for lang in cfg.languages]}
        if cfg.paradigm == "sft":
            if "output" not in meta:
                continue
            row["completion"] = [{"role": "assistant", "content": meta["output"]}]
        else:
            if "chosen" not in meta or "rejected" not in meta:
                continue
            row["chosen"] = [{"role": "assistant", "content": meta["chosen"]}]
            row["rejected"] = [{"role": "assistant", "content": meta["rejected"]}]
        rows.append(row)
    if refused:
        log.warning("mlc.harmful_pairs: %d harmful records give no pair, the model's own answer already refuses "
                    "(mlc.harmful_skip_refused): %s", len(refused), ", ".join(refused))
    return rows


def benign_answers(cfg: MLCConfig, model: Any, tokenizer: Any, records: list[ParallelRecord],
                   output_dir: str) -> dict[str, str] | None:
    """The model's own English answers to the benign records (``benign_pairs`` with ``benign_chosen: own``)
    and, with ``harmful_pairs``, to the harmful ones (their rejected side)."""
    benign = [r for r in records if r.category in BENIGN_CATEGORIES and all(c in r.texts for c in cfg.languages)]
    if not (cfg.benign_pairs and cfg.benign_chosen == "own"):
        benign = []
    if cfg.harmful_pairs:
        benign += [r for r in records if record_label(r) == "harmful" and all(c in r.texts for c in cfg.languages)]
    if not benign:
        return None
    from polyalign.train.make_responses import own_english_answers

    return own_english_answers(model, tokenizer, benign, Path(output_dir) / "benign_answers.jsonl",
                               cfg.benign_max_new_tokens)


def build_mlc_trainer(recipe: Any, model: Any, tokenizer: Any, records: list[ParallelRecord], args: Any,
                      device: str | None = None) -> Any:
    """The TRL trainer for ``recipe.mlc.paradigm`` with MLC attached. DPO with full fine-tuning gets
    its frozen reference from :func:`polyalign.train.recipes.reference_model` (the model loaded again
    through polyalign's own path, in the recipe's dtype, after TrainingArguments so ``zero.Init``
    shards it): TRL's own would reload ``config._name_or_path``, which a built-in or GGUF model does
    not have, in the policy's fp32."""
    import dataclasses

    from datasets import Dataset
    from trl import DPOConfig, SFTConfig

    from polyalign.errors import PolyalignError

    cfg = MLCConfig(**(recipe.mlc or {}))
    rows = mlc_rows(records, cfg, tokenizer, benign_answers(cfg, model, tokenizer, records, args.output_dir))
    if not rows:
        raise PolyalignError(f"no rows with English responses and prompts in all of {cfg.languages}")
    n_benign = sum(r.category in BENIGN_CATEGORIES for r in records if all(c in r.texts for c in cfg.languages))
    if cfg.benign_pairs and not n_benign:
        raise PolyalignError(f"mlc.benign_pairs: no benign records with prompts in all of {cfg.languages} "
                             "(set data.benign_source, e.g. builtin:benign, and languages it has)")
    MLCDPOTrainer, MLCSFTTrainer, MLCPreferenceTrainer = _trl_classes()
    base = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
    base["remove_unused_columns"] = False
    if base.get("ddp_find_unused_parameters") is None:
        base["ddp_find_unused_parameters"] = False  # every parameter gets a gradient each step (see compute_loss)
    if cfg.paradigm == "dpo":
        targs = DPOConfig(**base, beta=cfg.beta, loss_type=["sigmoid"], max_length=cfg.max_length)
        from polyalign.models.adapters import is_peft
        from polyalign.train.recipes import reference_model

        ref = None if is_peft(model) else reference_model(recipe, device)
        trainer = MLCDPOTrainer(model=model, ref_model=ref, args=targs, train_dataset=Dataset.from_list(rows),
                                processing_class=tokenizer)
    elif cfg.paradigm in ("simpo", "orpo"):
        # precompute_ref_log_probs: DPOTrainer then loads no reference copy (these losses need none).
        targs = DPOConfig(**base, beta=cfg.beta, max_length=cfg.max_length, precompute_ref_log_probs=True)
        trainer = MLCPreferenceTrainer(model=model, args=targs, train_dataset=Dataset.from_list(rows),
                                       processing_class=tokenizer, preference_loss=cfg.paradigm, beta=cfg.beta,
                                       gamma=cfg.simpo_gamma)
    else:
        targs = SFTConfig(**base, max_length=cfg.max_length, completion_only_loss=True)
        trainer = MLCSFTTrainer(model=model, args=targs, train_dataset=Dataset.from_list(rows),
                                processing_class=tokenizer)
    hidden = model.config.hidden_size if hasattr(model, "config") else model.get_base_model().config.hidden_size
    trainer.setup_mlc(cfg, hidden)
    return trainer
