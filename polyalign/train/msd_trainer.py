"""MSDTrainer: multilingual self-distillation on ``transformers.Trainer``.

Only ``compute_loss`` (sample y, run student and frozen teacher, call :func:`msd_loss`) and
``log`` (flush the method's metrics) are overridden; the loop, accumulation, checkpointing,
resume and distribution are Trainer's (accelerate: DDP, DeepSpeed, FSDP).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections import defaultdict
from typing import Any

import torch
from transformers import Trainer

from polyalign.data.records import ParallelRecord
from polyalign.losses.msd import (
    dpsw_raw_weights,
    mean_over_valid,
    normalize_weights,
    reduce_sequences,
    token_divergence,
)
from polyalign.models.adapters import is_peft
from polyalign.models.batching import left_pad, response_batch, response_logits, trim_generation
from polyalign.models.chat import prompt_ids
from polyalign.train.msd_config import MSDConfig


def build_msd_examples(records: list[ParallelRecord], cfg: MSDConfig) -> list[dict[str, str]]:
    """(target query, English query) pairs: one per record and student language present in it."""
    out = []
    for r in records:
        if cfg.teacher_language not in r.texts:
            continue
        for lang in cfg.student_languages:
            if lang in r.texts:
                out.append({"prompt_id": r.id, "lang": lang, "query": r.texts[lang],
                            "english": r.texts[cfg.teacher_language],
                            "retain": cfg.benign_retain and r.category == "benign"})
    return out


def _keep_batch(examples: list[dict[str, str]]) -> dict[str, Any]:
    """Collator: the examples travel as plain data; compute_loss tokenises after sampling."""
    return {"examples": examples}


class MSDTrainer(Trainer):
    def __init__(self, model: Any, args: Any, msd_config: MSDConfig, train_dataset: list[dict[str, str]],
                 processing_class: Any, ref_model: Any = None, **kwargs: Any):
        args.remove_unused_columns = False
        super().__init__(model=model, args=args, train_dataset=train_dataset, data_collator=_keep_batch,
                         processing_class=processing_class, **kwargs)
        self.msd = msd_config
        self._metrics: dict[str, list[float]] = defaultdict(list)
        # Frozen teacher = the initial weights. LoRA: the same network with the adapter disabled
        # (no second copy). Full fine-tuning: a frozen copy, sharded like the policy when needed.
        self.ref_model = None
        if not is_peft(model):
            ref = ref_model if ref_model is not None else copy.deepcopy(model)
            ref.requires_grad_(False).eval()
            if self.is_deepspeed_enabled:
                from trl.models.utils import prepare_deepspeed

                ref = prepare_deepspeed(ref, self.accelerator)
            elif self.is_fsdp_enabled:
                from trl.models.utils import prepare_fsdp

                ref = prepare_fsdp(ref, self.accelerator)
            else:
                ref = self.accelerator.prepare_model(ref, evaluation_mode=True)
            self.ref_model = ref
        tok = processing_class
        gen_cfg = getattr(model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else []) | {tok.eos_token_id}

    # ---------------------------------------------------------------- contexts
    def _prompts(self, examples: list[dict[str, str]]) -> tuple[list[list[int]], list[list[int]]]:
        """Student: the target query alone; teacher: the template with target + English query
        (or, for ``retain`` examples, the student's own context: the frozen model keeps them as they were)."""
        tok, cut = self.processing_class, self.msd.max_prompt_tokens
        student = [prompt_ids(tok, e["query"])[-cut:] for e in examples]
        teacher = [s if e.get("retain") else
                   prompt_ids(tok, self.msd.teacher_template.format(target_query=e["query"],
                                                                    english_query=e["english"]))[-cut:]
                   for s, e in zip(student, examples)]
        return student, teacher

    @contextlib.contextmanager
    def teacher_context(self, model: Any):
        """Yields the module that computes p_T: the policy with its adapter off, or the frozen copy."""
        if self.ref_model is not None:
            yield self.ref_model
        else:
            with self.accelerator.unwrap_model(model).disable_adapter():
                yield model

    @torch.no_grad()
    def sample_responses(self, model: Any, prompts: list[list[int]], from_teacher: bool) -> list[list[int]]:
        """y ~ q: on-policy from the current student, off-policy from the frozen teacher. Stops at EOS."""
        tok = self.processing_class
        ids, mask, _ = left_pad(prompts, tok.pad_token_id)
        device = self.accelerator.device
        greedy = self.msd.temperature == 0
        kwargs = {"max_new_tokens": self.msd.max_new_tokens, "do_sample": not greedy,
                  "temperature": None if greedy else self.msd.temperature, "top_p": None if greedy else self.msd.top_p,
                  "top_k": None, "pad_token_id": tok.pad_token_id, "use_cache": True,
                  "eos_token_id": sorted(self.eos_ids)}
        ctx = self.teacher_context(model) if from_teacher else contextlib.nullcontext(model)
        with ctx as gen_model:
            gen_model = self.accelerator.unwrap_model(gen_model)
            was_training = gen_model.training
            gen_model.eval()
            out = gen_model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            gen_model.train(was_training)
        return trim_generation(out[:, ids.shape[1]:], self.eos_ids, tok.pad_token_id)

    # ---------------------------------------------------------------- loss
    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        start = time.perf_counter()
        examples = inputs["examples"]
        student_prompts, teacher_prompts = self._prompts(examples)
        on_policy = self.msd.mode == "on_policy"
        responses = self.sample_responses(model, student_prompts if on_policy else teacher_prompts,
                                          from_teacher=not on_policy)
        device = self.accelerator.device
        pad = self.processing_class.pad_token_id
        s_batch = {k: v.to(device) for k, v in response_batch(student_prompts, responses, pad).items()}
        t_batch = {k: v.to(device) for k, v in response_batch(teacher_prompts, responses, pad).items()}
        mask = s_batch["response_mask"]                                          # [B, R]
        student_logits = response_logits(model, s_batch)                        # [B, R, V]
        with torch.no_grad(), self.teacher_context(model) as teacher:
            teacher_logits = response_logits(teacher, t_batch)                   # [B, R, V]
        # msd_loss, spelled out so the per-token divergence and raw DPSW weights (two passes over the
        # vocabulary) are computed once and reused for the logs.
        d = token_divergence(student_logits, teacher_logits, self.msd.divergence, self.msd.jsd_beta)   # [B, R]
        raw = dpsw_raw_weights(student_logits, teacher_logits, self.msd.top_k)                         # [B, R]
        w = normalize_weights(raw, mask) if self.msd.dpsw else mask.to(d.dtype)
        per_seq, valid = reduce_sequences(d, w, mask)
        loss = mean_over_valid(per_seq, valid, student_logits)
        self._record(examples, d.detach(), raw, mask, time.perf_counter() - start)
        return (loss, {"student_logits": student_logits}) if return_outputs else loss

    @torch.no_grad()
    def _record(self, examples, d, raw, mask, seconds: float) -> None:
        n = mask.sum(-1)
        m = self._metrics
        m["dpsw_raw_weight"].append(float(raw[mask].mean()) if mask.any() else 0.0)
        m["response_length"].append(float(n.float().mean()))
        m["tokens_per_second"].append(float(n.sum()) / max(seconds, 1e-9))
        for e, row_d, row_m in zip(examples, d, mask):
            if row_m.any():
                m[f"divergence/{e['lang']}"].append(float(row_d[row_m].mean()))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Flush the MSD metrics gathered since the last log (averaged over steps and ranks).
        if self._metrics and "loss" in logs:
            for key, vals in self._metrics.items():
                value = sum(vals) / len(vals)
                if not key.startswith("divergence/"):  # per-language keys differ across ranks: local mean
                    t = torch.tensor(value, device=self.accelerator.device)
                    value = float(self.accelerator.reduce(t, reduction="mean"))
                logs[key] = round(value, 6)
            self._metrics.clear()
        super().log(logs, start_time)
