"""MSDTrainer: multilingual self-distillation on ``transformers.Trainer``.

Only ``compute_loss`` (sample y, run student and frozen teacher, call the MSD loss pieces) and
``log`` (flush the method's metrics) are overridden, plus checkpoint hooks for the MLC head when
MSD + MLC is on; the loop, accumulation, checkpointing, resume and distribution are Trainer's
(accelerate: DDP, DeepSpeed, FSDP).

Options beyond the paper (MSDConfig): teacher gating (drop prompts the teacher handles wrongly),
a separately weighted benign term with its own teacher context, a language hint for the teacher,
and the MLC term over the batch's prompts (``mlc_config``; :mod:`polyalign.train.mlc_term`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from trl.models.utils import _ForwardRedirection, unwrap_model_for_generation

from polyalign.data.records import ParallelRecord, atomic_write_text, record_label, require_labels
from polyalign.errors import PolyalignError
from polyalign.losses.msd import (
    dpsw_raw_weights,
    fused_token_divergence,
    normalize_weights,
    reduce_sequences,
    token_divergence,
    weighted_mean_over_valid,
)
from polyalign.models.adapters import is_peft
from polyalign.models.batching import (
    cache_kwarg,
    left_pad,
    merged_prefix_cache,
    prefixed_response_hidden,
    prompt_prefix,
    response_batch,
    response_hidden,
    response_logits,
    shares_prefill,
    trim_generation,
)
from polyalign.models.chat import prompt_ids
from polyalign.models.greedy import can_compact, greedy_ids
from polyalign.models.sampling import sampling_kwargs
from polyalign.text import get_language, in_language, refusal_phrase
from polyalign.train import vllm_sampling
from polyalign.train.metrics import MetricSums
from polyalign.train.mlc_config import MLCConfig
from polyalign.train.mlc_term import MLCHeadCheckpoint, MLCTerm, accumulation_scale, variant_inputs
from polyalign.train.msd_config import ENGLISH_ONLY_TEMPLATE, MSDConfig

log = logging.getLogger(__name__)
GATE_FILE = "teacher_gate.json"
SFT_TARGETS_FILE = "sft_targets.json"      # msd.mode: sft, the teacher's greedy answers (token ids)


class TrainedShardedHead:
    """A sharded LM head that trains (full fine-tuning under ZeRO-3 / FSDP), for the fused divergence.

    Its weight is whole only inside the engine's forward, and its gradient must reach the engine's
    own reduction. So the student's forward, head and divergence run inside the wrapper's forward
    (TRL's ``_ForwardRedirection``, as its DistillationTrainer does), and :meth:`full` hands the
    divergence a differentiable whole weight: FSDP2's ``DTensor.full_tensor()`` (an all-gather whose
    backward reduce-scatters), ZeRO-3's ``GatheredParameters`` (read-only) or FSDP1's unsharded view
    inside the root forward (FSDP1, or FSDP2 with the head in the root unit), cloned. The copy is what the fused backward recomputes from (one V x H
    per rank, as for a frozen head); its gradient flows to the sharded parameter, which the engine
    reduces like any other parameter's.
    """

    def __init__(self, module: torch.nn.Linear, engine: str):
        self.module, self.engine = module, engine

    @contextlib.contextmanager
    def full(self):
        """(weight, bias), whole and differentiable w.r.t. the sharded parameters."""
        from torch.distributed.tensor import DTensor

        w, b = self.module.weight, self.module.bias
        if isinstance(w, DTensor):          # FSDP2 with the head in its own unit: sharded outside its forward
            yield w.full_tensor(), None if b is None else b.full_tensor()
            return
        gather = contextlib.nullcontext()
        if self.engine == "zero3" and getattr(getattr(w, "ds_status", None), "name", None) != "AVAILABLE":
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([p for p in (w, b) if p is not None], modifier_rank=None)
        with gather:
            w, b = self.module.weight, self.module.bias
            if w.dim() != 2 or w.shape != (self.module.out_features, self.module.in_features):
                raise PolyalignError(f"msd.fused_lm_head: the {self.engine} LM head is not whole inside the forward "
                                     f"(weight {tuple(w.shape)}); set msd.fused_lm_head: false")
            yield w.clone(), None if b is None else b.clone()


def build_msd_examples(records: list[ParallelRecord], cfg: MSDConfig) -> list[dict[str, Any]]:
    """(target query, English query) pairs: one per record and student language present in it
    (benign records: each of ``cfg.benign_languages`` when set).

    ``label`` is the record's harmful/benign label (:func:`~polyalign.data.records.record_label`;
    None with ``cfg.labels: none``, where it is never read) and ``benign`` whether it is benign. A
    record without a label is never taken for harmful: when the config reads labels
    (:meth:`MSDConfig.reads_labels`) such a record is refused, naming its file and row; otherwise
    every prompt gets the same teacher context and the label changes nothing but the logged
    ``loss/harmful`` / ``loss/benign`` split. ``texts`` keeps the prompt in the teacher and student
    languages for the MLC term.
    """
    if cfg.reads_labels():
        require_labels(records, "msd." + ", msd.".join(cfg.label_settings() or ["labels=required"]))
    out = []
    langs = [cfg.teacher_language, *cfg.student_languages]
    for r in records:
        if cfg.teacher_language not in r.texts:
            continue
        label = None if cfg.labels == "none" else record_label(r)
        benign = label == "benign"
        for lang in (cfg.benign_languages or cfg.student_languages) if benign else cfg.student_languages:
            if lang in r.texts:
                out.append({"prompt_id": r.id, "lang": lang, "query": r.texts[lang],
                            "english": r.texts[cfg.teacher_language], "benign": benign, "label": label,
                            "texts": {c: r.texts[c] for c in langs if c in r.texts}})
    return out


def gate_examples(examples: list[dict[str, Any]], answers: list[str]) -> tuple[list[dict[str, Any]], dict[str, Counter]]:
    """Keep harmful prompts the teacher refuses and benign prompts it answers.

    Returns (kept examples, per-language counts of ``kept`` / ``dropped_harmful_answered`` /
    ``dropped_benign_refused``). Refusal = the lexicon judge's phrase list (query language + English).
    """
    kept, counts = [], defaultdict(Counter)
    for e, answer in zip(examples, answers, strict=True):
        refused = refusal_phrase(answer, e["lang"]) is not None
        if refused != e["benign"]:
            kept.append(e)
            counts[e["lang"]]["kept"] += 1
        else:
            counts[e["lang"]]["dropped_benign_refused" if e["benign"] else "dropped_harmful_answered"] += 1
    return kept, dict(counts)


def frozen_reference(model: Any, args: Any) -> Any:
    """Full fine-tuning's teacher when none is given: the initial weights loaded again from the
    policy's spec through :func:`polyalign.models.load_model` (under ZeRO-3 through ``zero.Init``,
    sharded like the policy), in bf16 when training autocasts to it, else the policy's dtype. A
    ``deepcopy`` of the policy was a second fp32, unsharded model on every rank."""
    from polyalign.models.loading import load_model, model_dtype
    from polyalign.train.recipes import training_device

    spec = getattr(getattr(model, "config", None), "polyalign_spec", None)
    if spec is None:
        raise PolyalignError("full fine-tuning needs ref_model= (the frozen teacher): this model was not loaded "
                             "by polyalign.models.load_model, so its initial weights cannot be loaded again")
    dtype = "bfloat16" if args.bf16 else model_dtype(model)
    return load_model(spec, dtype=dtype, device=training_device(args))


def _keep_batch(examples: list[dict[str, str]]) -> dict[str, Any]:
    """Collator: the examples travel as plain data; compute_loss tokenises after sampling."""
    return {"examples": examples}


class MSDTrainer(Trainer):
    # The MSD loss is a mean per micro-batch: Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, model: Any, args: Any, msd_config: MSDConfig, train_dataset: list[dict[str, Any]],
                 processing_class: Any, ref_model: Any = None, mlc_config: MLCConfig | None = None, **kwargs: Any):
        args.remove_unused_columns = False
        if mlc_config is not None and mlc_config.weight > 0 and args.ddp_find_unused_parameters is None:
            # The MLC head gets its gradient outside DDP's forward (and an exact zero on steps without the
            # term): DDP looking for unused parameters marks it ready at the forward, then again in backward.
            args.ddp_find_unused_parameters = False
        super().__init__(model=model, args=args, train_dataset=train_dataset, data_collator=_keep_batch,
                         processing_class=processing_class, **kwargs)
        self.msd, self.mlc = msd_config, mlc_config         # the method's settings (MLC: as MLCTrainer holds them)
        self._metrics = MetricSums()                 # reduced over ranks at each log
        self._once: dict[str, float] = {}            # logged with the first log line (gate counts)
        # Frozen teacher = the initial weights. LoRA: the same network with the adapter disabled
        # (no second copy). Full fine-tuning: the initial weights loaded frozen (:func:`frozen_reference`),
        # sharded like the policy when needed.
        self.ref_model = None
        if not is_peft(model):
            ref = ref_model if ref_model is not None else frozen_reference(model, args)
            ref.requires_grad_(False).eval()
            if self.is_deepspeed_enabled:
                from trl.models.utils import prepare_deepspeed

                ref = prepare_deepspeed(ref, self.accelerator)
            elif self.is_fsdp_enabled:
                from trl.models.utils import prepare_fsdp

                ref = prepare_fsdp(ref, self.accelerator)
            else:
                # On this rank's device in its own dtype: prepare_model would add autocast and fp32 outputs
                # (the [B, R, V] teacher logits at twice their size, and a bf16 head fed fp32 hidden states).
                ref = ref.to(self.accelerator.device)
            self.ref_model = ref
        tok = processing_class
        gen_cfg = getattr(model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else []) | {tok.eos_token_id}
        # MSD + MLC: the consistency term over every prompt of the batch, in English and every student language.
        self.mlc_term = None
        if mlc_config is not None and mlc_config.weight > 0:
            base = self.accelerator.unwrap_model(self.model)
            hidden = base.config.hidden_size if hasattr(base, "config") else base.get_base_model().config.hidden_size
            self.mlc_term = MLCTerm(mlc_config, base, hidden, args.seed, args.device)
            self.add_callback(MLCHeadCheckpoint(self.mlc_term.head, self))
        if self.msd.teacher_gating:
            from transformers.integrations.fsdp import is_fsdp_enabled

            if is_fsdp_enabled():
                raise PolyalignError("msd.teacher_gating probes before training starts, where FSDP's "
                                     "cpu_ram_efficient_loading has left ranks other than 0 without weights: "
                                     "set fsdp_cpu_ram_efficient_loading to false for a gated run")
            self.train_dataset = self._gate(train_dataset)
        if self.msd.mode == "sft":          # label_sft: the teacher's greedy answers are the targets
            self.train_dataset = [{**e, "target": t} for e, t in
                                  zip(self.train_dataset, self.teacher_targets(self.train_dataset), strict=True)]

    # ---------------------------------------------------------------- contexts
    def _prompts(self, examples: list[dict[str, Any]]) -> tuple[list[list[int]], list[list[int]]]:
        """Student: the target query alone. Teacher: :meth:`teacher_text`, or for benign prompts with
        ``benign_target: retain`` and every prompt in ``retain_languages`` the student's own context
        (the frozen model keeps them as they were)."""
        tok, cut = self.processing_class, self.msd.max_prompt_tokens
        student = [prompt_ids(tok, e["query"], max_tokens=cut) for e in examples]
        teacher = [s if self.msd.retains(e["lang"], e["benign"]) else
                   prompt_ids(tok, self.teacher_text(e), max_tokens=cut) for s, e in zip(student, examples)]
        return student, teacher

    def teacher_text(self, e: dict[str, Any]) -> str:
        """The teacher's user turn: the template (the English query alone for benign prompts with
        ``benign_target: english``), ending with "Answer in <language>." (harmful prompts: ``harmful_hint``
        when set) when ``language_hint`` covers the language and ``hint_prompts`` the prompt's kind."""
        english_only = e["benign"] and self.msd.benign_target == "english"
        template = ENGLISH_ONLY_TEMPLATE if english_only else self.msd.teacher_template
        if self.msd.hints(e["lang"], e["benign"]):
            template += self.msd.hint_text(e["benign"])
        return template.format(target_query=e["query"], english_query=e["english"],
                               target_language=get_language(e["lang"]).name)

    @contextlib.contextmanager
    def teacher_context(self, model: Any):
        """Yields the module that computes p_T: the policy with its adapter off, or the frozen copy."""
        if self.ref_model is not None:
            yield self.ref_model
        else:
            with self.accelerator.unwrap_model(model).disable_adapter():
                yield model

    @torch.no_grad()
    def sample_responses(self, model: Any, prompts: list[list[int]], from_teacher: bool,
                         greedy: bool = False, max_new_tokens: int | None = None,
                         prefix: list | None = None) -> list[list[int]]:
        """y ~ q: on-policy from the current student, off-policy from the frozen teacher. Stops at EOS.

        Every generation setting is explicit (:func:`sampling_kwargs`): the model's own
        ``generation_config`` (a repetition penalty, top_k, ...) must not change q.
        ``greedy`` / ``max_new_tokens`` override the config (the teacher-gating probe).
        ``msd.use_vllm``: the training samples (from the model ``msd.mode`` names) come from vLLM, one
        engine call per optimizer step (:class:`polyalign.train.vllm_sampling.StepSampler`); the probe
        stays here. ``prefix``: the prompts' keys and values but the last token's, already computed
        (:func:`prompt_prefix`): ``generate`` starts from a detached copy instead of prefilling.
        """
        if (self.msd.use_vllm and not greedy and max_new_tokens is None
                and from_teacher == (self.msd.mode == "off_policy")):
            return self._vllm_sampler().sample(prompts, self.state.global_step)
        tok = self.processing_class
        ids, mask, _ = left_pad(prompts, tok.pad_token_id)
        device = self.accelerator.device
        kwargs = sampling_kwargs(max_new_tokens or self.msd.max_new_tokens, 0.0 if greedy else self.msd.temperature,
                                 self.msd.top_p, tok.pad_token_id, sorted(self.eos_ids), draw=self.msd.draw)
        kwargs.update(vllm_sampling.hf_generation_kwargs(self.accelerator))     # synced_gpus when sharded
        if prefix is not None:
            kwargs[cache_kwarg()] = merged_prefix_cache(prefix, list(range(len(prompts))), detach=True)[0]
        ctx = self.teacher_context(model) if from_teacher else contextlib.nullcontext(model)
        # TRL's unwrap gathers ZeRO-3 shards for generate (a sharded module cannot generate) and unwraps
        # DDP / FSDP; under FSDP1 the root unit's own parameters are summoned, as TRL's trainers do.
        with (ctx as wrapped, unwrap_model_for_generation(wrapped, self.accelerator) as gen_model,
              vllm_sampling.full_root_params(wrapped, self.accelerator)):
            was_training = gen_model.training
            gen_model.eval()
            if greedy and prefix is None and self._greedy_compacts(gen_model):
                # the teacher's greedy answers (sft targets, gating): as evaluation decodes, the
                # template's head once and ended rows leaving the batch (polyalign/models/greedy.py)
                answers = greedy_ids(gen_model, prompts, kwargs["max_new_tokens"], self.eos_ids, tok.pad_token_id)
                gen_model.train(was_training)
                return answers
            out = gen_model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            gen_model.train(was_training)
        return trim_generation(out[:, ids.shape[1]:], self.eos_ids, tok.pad_token_id)

    def _greedy_compacts(self, model: Any) -> bool:
        """Whether greedy answers may decode row by row (:func:`polyalign.models.greedy.greedy_ids`): not
        under ZeRO-3 / FSDP, whose ranks must run as many forwards as each other (``synced_gpus``)."""
        return not (self.is_deepspeed_enabled or self.is_fsdp_enabled) and can_compact(model)

    def _vllm_sampler(self) -> vllm_sampling.StepSampler:
        """The vLLM engine (TRL's ``VLLMGeneration``) and its per-step schedule, built on first use, when
        the policy is already wrapped (every rank reaches it together: building it is a collective)."""
        if getattr(self, "_step_sampler", None) is None:
            engine = vllm_sampling.build_engine(self.model, self.accelerator, self.processing_class, self.msd,
                                                self.eos_ids)
            self._step_sampler = vllm_sampling.StepSampler(engine, push_weights=self.msd.mode == "on_policy",
                                                           seed=self.args.seed, eos_ids=self.eos_ids)
        return self._step_sampler

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        """Trainer fetches an optimizer step's micro-batches before running them; with vLLM their prompts
        are planned, so the step's first micro-batch samples all of them in one call (TRL's GRPO)."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.msd.use_vllm and batches and self.msd.mode in ("on_policy", "off_policy"):
            side = 0 if self.msd.mode == "on_policy" else 1             # student or teacher prompts
            self._vllm_sampler().plan([self._prompts(b["examples"])[side] for b in batches])
        return batches, num_items

    # ---------------------------------------------------------------- teacher gating
    def teacher_answers(self, examples: list[dict[str, Any]]) -> list[str]:
        """The frozen teacher's greedy, short answer to each example in its training context, cached
        in ``output_dir/teacher_gate.json`` (keyed by model, context and length) so reruns and resumes
        do not probe again."""
        _, teacher = self._prompts(examples)
        name = getattr(getattr(self.accelerator.unwrap_model(self.model), "config", None), "_name_or_path", "")
        n = self.msd.gating_max_new_tokens
        keys = [hashlib.sha256(json.dumps([name, n, t]).encode()).hexdigest()[:24] for t in teacher]
        path = Path(self.args.output_dir) / GATE_FILE
        cache = json.loads(path.read_text()) if path.exists() else {}
        todo = sorted({k: i for i, k in enumerate(keys) if k not in cache}.values(), key=lambda i: len(teacher[i]))
        bs = max(self.greedy_batch_size, self.args.per_device_train_batch_size)
        # Each rank probes its share and every rank gets all answers. Sharded engines gather weights per
        # generate call, a collective: there every rank gets as many prompts (the last one repeated).
        answers = []
        sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled
        with self.accelerator.split_between_processes(todo, apply_padding=sharded) as mine:
            for start in range(0, len(mine), bs):                  # similar lengths per batch: less padding
                idx = mine[start:start + bs]
                out = self.sample_responses(self.model, [teacher[i] for i in idx], from_teacher=True, greedy=True,
                                            max_new_tokens=n)
                answers += [(keys[i], self.processing_class.decode(ids, skip_special_tokens=True))
                            for i, ids in zip(idx, out)]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            answers = gather_object(answers)
        cache.update(answers)
        if todo and self.accelerator.is_main_process:              # one writer
            atomic_write_text(path, json.dumps(cache, ensure_ascii=False, indent=0))
        return [cache[k] for k in keys]

    def teacher_targets(self, examples: list[dict[str, Any]]) -> list[list[int]]:
        """``msd.mode: sft``: the frozen teacher's greedy answer (token ids, ``msd.max_new_tokens``) to
        each example in its training context, what the student is then trained on by cross-entropy;
        cached in ``output_dir/sft_targets.json`` (keyed by model, context and length)."""
        _, teacher = self._prompts(examples)
        name = getattr(getattr(self.accelerator.unwrap_model(self.model), "config", None), "_name_or_path", "")
        n = self.msd.max_new_tokens
        keys = [hashlib.sha256(json.dumps(["sft", name, n, t]).encode()).hexdigest()[:24] for t in teacher]
        path = Path(self.args.output_dir) / SFT_TARGETS_FILE
        cache = json.loads(path.read_text()) if path.exists() else {}
        todo = sorted({k: i for i, k in enumerate(keys) if k not in cache}.values(), key=lambda i: len(teacher[i]))
        bs = max(self.greedy_batch_size, self.args.per_device_train_batch_size)
        for start in range(0, len(todo), bs):
            idx = todo[start:start + bs]
            out = self.sample_responses(self.model, [teacher[i] for i in idx], from_teacher=True, greedy=True,
                                        max_new_tokens=n)
            for i, ids in zip(idx, out):
                cache[keys[i]] = [int(t) for t in ids]
        if todo and self.accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(cache))
        return [cache[k] for k in keys]

    def _sft_loss(self, model: Any, examples: list[dict[str, Any]], student_prompts: list[list[int]]):
        """(loss, student logits, per-token NLL [B, R], mask [B, R], per-sequence loss, valid): the
        student's cross-entropy on the teacher's greedy answers, per sequence a mean over its tokens,
        benign sequences weighted ``benign_weight`` as in distillation."""
        device = self.accelerator.device
        responses = [list(e["target"]) for e in examples]
        batch = {k: v.to(device) for k, v in
                 response_batch(student_prompts, responses, self.processing_class.pad_token_id).items()}
        mask = batch["response_mask"]
        logits = response_logits(model, batch)                                       # [B, R, V]
        target = batch["input_ids"][:, -mask.shape[1]:]                               # [B, R]
        nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), target, reduction="none")
        per_seq, valid = reduce_sequences(nll, mask.to(nll.dtype), mask)
        benign = torch.tensor([e["benign"] for e in examples], device=device)
        loss = weighted_mean_over_valid(per_seq, valid, torch.where(benign, self.msd.benign_weight, 1.0), logits)
        return loss, logits, responses, nll, mask, per_seq, valid, benign

    def _gate(self, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        kept, counts = gate_examples(examples, self.teacher_answers(examples))
        for lang, c in sorted(counts.items()):
            log.info("teacher gating %s: %s", lang, dict(c))
            self._once.update({f"gate/{lang}/{k}": float(v) for k, v in c.items()})
        if not kept:
            raise PolyalignError("teacher gating dropped every training prompt: the teacher refuses no harmful "
                                 "and answers no benign prompt (see `python -m polyalign.train.teacher_probe`)")
        return kept

    # ---------------------------------------------------------------- loss
    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        start = time.perf_counter()
        examples = inputs["examples"]
        student_prompts, teacher_prompts = self._prompts(examples)
        if self.msd.mode == "sft":
            loss, logits, responses, nll, mask, per_seq, valid, benign = self._sft_loss(model, examples, student_prompts)
            if self.mlc_term is not None and model.training:
                loss = loss + self._mlc(model, examples, num_items_in_batch)
            self._record(examples, responses, nll.detach(), mask.float(), mask, per_seq.detach(), valid, benign,
                         time.perf_counter() - start)
            return (loss, {"student_logits": logits}) if return_outputs else loss
        on_policy = self.msd.mode == "on_policy"
        stage = getattr(self, "stage_clock", None) or (lambda _name: contextlib.nullcontext())  # msd_profile.py
        fast = self._fast_step()
        prefix = None
        if fast and on_policy and self._shares_prefill(model, student_prompts, fused=not return_outputs):
            with stage("student forward"):          # the prompt's half of the training forward, kept
                prefix = prompt_prefix(model, student_prompts, self.processing_class.pad_token_id,
                                       self.accelerator.device, share_head=self.share_head)
        with stage("sampling"), self._sampling_weights(model, on_policy, fast):
            responses = self.sample_responses(model, student_prompts if on_policy else teacher_prompts,
                                              from_teacher=not on_policy, prefix=prefix)
        if hasattr(stage, "record"):
            stage.record(student_prompts=student_prompts, teacher_prompts=teacher_prompts, responses=responses,
                         shared_prefill=prefix is not None, shared_head=fast and self.share_head)
        # msd_loss, spelled out so the per-token divergence and raw DPSW weights (two passes over the
        # vocabulary) are computed once and reused for the logs.
        student_out, d, raw, mask = self._token_divergence(model, student_prompts, teacher_prompts, responses,
                                                           fused=not return_outputs, packed=fast, stage=stage,
                                                           prefix=prefix)
        device = self.accelerator.device
        w = normalize_weights(raw, mask) if self.msd.dpsw else mask.to(d.dtype)
        per_seq, valid = reduce_sequences(d, w, mask)                                                  # [B], [B]
        # Benign sequences count benign_weight times (1: the plain batch mean).
        benign = torch.tensor([e["benign"] for e in examples], device=device)
        seq_weight = torch.where(benign, self.msd.benign_weight, 1.0)
        loss = weighted_mean_over_valid(per_seq, valid, seq_weight, student_out)
        if self.mlc_term is not None and model.training:
            loss = loss + self._mlc(model, examples, num_items_in_batch)
        self._record(examples, responses, d.detach(), raw, mask, per_seq.detach(), valid, benign,
                     time.perf_counter() - start)
        return (loss, {"student_logits": student_out}) if return_outputs else loss

    # The step as it was before issue #26 (one left-padded forward per side over the whole batch, PEFT's
    # wrappers while sampling): kept selectable so tests and benchmarks/msd_profile.py compare the two.
    legacy_step: bool = False

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """Trainer's step, with the student's LoRA layers adding their term in one pass
        (:mod:`polyalign.models.lora_add`: PEFT's numbers bit for bit, fewer fp32 [tokens, out] passes)
        over the forward and the backward, a checkpointed layer's recomputation included."""
        with self._one_pass_lora(model):
            return super().training_step(model, inputs, num_items_in_batch)

    @contextlib.contextmanager
    def _one_pass_lora(self, model: Any):
        if self.legacy_step or self.is_deepspeed_enabled or self.is_fsdp_enabled or not is_peft(
                unwrapped := self.accelerator.unwrap_model(model)):
            yield
            return
        from polyalign.models import lora_add

        lora_add.install(unwrapped)
        try:
            yield
        finally:
            lora_add.uninstall(unwrapped)

    def _fast_step(self) -> bool:
        """Whether this step packs its forwards by length and folds LoRA while sampling: on one process
        without ZeRO-3 / FSDP / vLLM. (Grouped forwards are a different number of forward calls per
        rank, which DDP's hooks and sharded engines' collectives cannot take; vLLM pushes the wrapped
        module's weights itself.)"""
        return not (self.legacy_step or self.accelerator.num_processes > 1 or self.is_deepspeed_enabled
                    or self.is_fsdp_enabled or self.msd.use_vllm)

    # Rows a batch of the teacher's greedy answers holds (``msd.mode: sft`` targets, gating): with ended
    # rows leaving the batch (greedy_ids), more rows cost little more per token (benchmarks/teacher_targets.py).
    greedy_batch_size: int = 32

    # Whether the fast step computes the student's prompt once (``prompt_prefix``) for sampling and
    # training; off, ``generate`` prefills it and the training forward runs it again (same values).
    share_prefill: bool = True
    # Whether the fast step's forwards run the tokens every prompt of a batch starts with (the chat
    # template's system turn) once and let every row attend to them (:func:`shared_head_length`).
    share_head: bool = True

    def _shares_prefill(self, model: Any, student_prompts: list[list[int]], fused: bool) -> bool:
        """Whether this on-policy fast step can run the student's prompt once, in the training forward,
        and sample from its kept keys and values: the fused packed path (the forward that reads them),
        no dropout to differ between training and sampling, full attention only, prompts of 2+ tokens."""
        if not (self.share_prefill and fused and self.msd.fused_lm_head) or min(map(len, student_prompts)) < 2:
            return False
        heads = self._heads(model)
        return (None not in heads and not isinstance(heads[0], TrainedShardedHead)
                and shares_prefill(self.accelerator.unwrap_model(model)))

    def _heads(self, model: Any) -> tuple[Any, Any]:
        """(student head, teacher head), each :meth:`_linear_head` of its side (None: not fusable)."""
        with self.teacher_context(model) as teacher:
            return self._linear_head(model), self._linear_head(teacher)

    def _sampling_weights(self, model: Any, on_policy: bool, fast: bool):
        """On-policy sampling with LoRA folded into one linear layer per wrapped module, computed by
        oneDNN while decoding on a CPU in fp32 (:func:`polyalign.models.sampling.decoding_linears`; base
        weights untouched). Off-policy sampling disables the adapter itself (PEFT's ``disable_adapter``
        needs the wrappers in place): as it was."""
        if not (fast and on_policy):
            return contextlib.nullcontext()
        from polyalign.models.sampling import PackedWeights, decoding_linears

        if getattr(self, "_packed_frozen", None) is None:     # the frozen LM head, packed once for every step
            self._packed_frozen = PackedWeights()
        return decoding_linears(self.accelerator.unwrap_model(model), keep=self._packed_frozen)

    def _token_divergence(self, model: Any, student_prompts: list[list[int]], teacher_prompts: list[list[int]],
                          responses: list[list[int]], fused: bool, packed: bool = False, stage: Any = None,
                          prefix: list | None = None):
        """(student output, D [B, R], raw DPSW weights [B, R], response mask [B, R]). Fused
        (``msd.fused_lm_head``, where the head allows it): from the final hidden states, no [B, R, V]
        logits held; otherwise from full logits, output the student logits [B, R, V] (``fused=False``:
        what ``return_outputs`` hands out).

        ``packed`` (fused only): student and teacher run in length groups and only the real response
        positions reach the head (:func:`polyalign.models.batching.packed_response_hidden`); D and the
        weights are scattered back to [B, R] with zeros off the mask, which the loss never reads. Same
        values as one padded forward up to float rounding; the teacher's prompts (template + English
        query) are much longer than most students', so padding was a large share of the step.
        ``prefix`` (packed only): the student's prompts already ran (:func:`prompt_prefix`); its forward
        runs the responses on their kept keys and values (:func:`prefixed_response_hidden`)."""
        from polyalign.models.batching import packed_response_hidden, response_mask

        cfg = self.msd
        stage = stage or (lambda _name: contextlib.nullcontext())
        device, pad = self.accelerator.device, self.processing_class.pad_token_id
        heads = self._heads(model) if fused and cfg.fused_lm_head else None
        fusable = heads is not None and None not in heads
        if packed and fusable and not isinstance(heads[0], TrainedShardedHead):
            mask = response_mask(responses).to(device)                          # [B, R]
            with stage("student forward"):
                h_s = (packed_response_hidden(model, student_prompts, responses, pad, heads[0], device,  # [N, H]
                                              share_head=self.share_head)
                       if prefix is None else
                       prefixed_response_hidden(model, prefix, student_prompts, responses, heads[0], device))
            with stage("teacher forward"), torch.no_grad(), self.teacher_context(model) as teacher:
                h_t = packed_response_hidden(teacher, teacher_prompts, responses, pad, heads[1], device,  # [N, H]
                                             share_head=self.share_head)
            with stage("head + divergence"):
                d_n, raw_n = fused_token_divergence(h_s, h_t, heads[0].weight, heads[0].bias, cfg.divergence,
                                                    cfg.jsd_beta, cfg.top_k, teacher_weight=heads[1].weight,
                                                    teacher_bias=heads[1].bias)
                d = d_n.new_zeros(mask.shape).masked_scatter(mask, d_n)
                raw = raw_n.new_zeros(mask.shape).masked_scatter(mask, raw_n)
            return h_s, d, raw, mask
        s_batch = {k: v.to(device) for k, v in response_batch(student_prompts, responses, pad).items()}
        t_batch = {k: v.to(device) for k, v in response_batch(teacher_prompts, responses, pad).items()}
        mask = s_batch["response_mask"]                                          # [B, R]
        if not fusable:
            with stage("student forward"):
                student_logits = response_logits(model, s_batch)                # [B, R, V]
            with stage("teacher forward"), torch.no_grad(), self.teacher_context(model) as teacher:
                teacher_logits = response_logits(teacher, t_batch)               # [B, R, V]
            with stage("head + divergence"):
                d = token_divergence(student_logits, teacher_logits, cfg.divergence, cfg.jsd_beta)
                raw = dpsw_raw_weights(student_logits, teacher_logits, cfg.top_k)
            return student_logits, d, raw, mask
        if isinstance(heads[0], TrainedShardedHead):      # full fine-tuning under ZeRO-3 / FSDP
            with stage("teacher forward"), torch.no_grad(), self.teacher_context(model) as teacher:
                h_t = response_hidden(teacher, t_batch, heads[1])                # [B, R, H]
            with stage("student forward + head + divergence"):
                # inside the wrapper's forward, as TRL's DistillationTrainer does, so DDP / FSDP / ZeRO-3
                # hold the student's parameters and reduce the head's gradient like any other
                unwrapped = self.accelerator.unwrap_model(model)
                h_s, d, raw = _ForwardRedirection()(model, unwrapped, self._student_fused, unwrapped, heads[0],
                                                    s_batch, h_t, heads[1])
            return h_s, d, raw, mask
        with stage("student forward"):
            h_s = response_hidden(model, s_batch, heads[0])                      # [B, R, H]
        with stage("teacher forward"), torch.no_grad(), self.teacher_context(model) as teacher:
            h_t = response_hidden(teacher, t_batch, heads[1])                    # [B, R, H]
        with stage("head + divergence"):
            d, raw = fused_token_divergence(h_s, h_t, heads[0].weight, heads[0].bias, cfg.divergence, cfg.jsd_beta,
                                            cfg.top_k, teacher_weight=heads[1].weight, teacher_bias=heads[1].bias)
        return h_s, d, raw, mask

    def _student_fused(self, student: Any, head: TrainedShardedHead, s_batch: dict[str, torch.Tensor],
                       h_t: torch.Tensor, teacher_head: torch.nn.Linear) -> tuple[torch.Tensor, ...]:
        """(h_s, D, raw DPSW weights) of a student whose sharded head trains; runs inside the wrapper's
        forward (:class:`TrainedShardedHead`)."""
        cfg = self.msd
        h_s = response_hidden(student, s_batch, head.module)                     # [B, R, H]
        with head.full() as (weight, bias):
            d, raw = fused_token_divergence(h_s, h_t, weight, bias, cfg.divergence, cfg.jsd_beta, cfg.top_k,
                                            teacher_weight=teacher_head.weight, teacher_bias=teacher_head.bias)
        return h_s, d, raw

    def _linear_head(self, module: Any) -> torch.nn.Linear | TrainedShardedHead | None:
        """The LM head when logits are exactly ``head(final hidden state)``; None (unfused path, with one
        warning per reason) for a head that is not a plain Linear (LoRA on lm_head, quantised), logit
        soft-capping or scaling in the config.

        ZeRO-3 and FSDP shard the head outside the forward. A frozen one (LoRA's base head, the
        teacher's) is materialised once and kept: ZeRO-3 gathers it (``GatheredParameters``,
        ``modifier_rank=None``: read only), FSDP2 all-gathers its DTensor (``full_tensor``), FSDP1 summons
        the root unit's parameters (the head's unit under transformer auto-wrap). Frozen, it cannot
        change, and the fused divergence reads it only in its forward (dD/dh is saved there). Cost: one
        V x H copy per rank (1.1 GB for Qwen2.5-7B in bf16) against [B, R, V] logits for student,
        teacher and their gradient. A sharded head that trains (full fine-tuning) is a
        :class:`TrainedShardedHead`, gathered inside the wrapper's forward.
        """
        from torch.distributed.tensor import DTensor

        m = self.accelerator.unwrap_model(module)
        head, cfg = m.get_output_embeddings(), getattr(m, "config", None)
        capped = any(getattr(cfg, a, None) not in (None, 1, 1.0)
                     for a in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
        if type(head) is not torch.nn.Linear:
            return self._cannot_fuse("the LM head is not a plain Linear (an adapter on lm_head, or quantised)")
        if capped:
            return self._cannot_fuse("the model soft-caps or scales its logits")
        zero3, dtensor = hasattr(head.weight, "ds_id"), isinstance(head.weight, DTensor)
        if not (zero3 or dtensor or self.is_fsdp_enabled):
            if head.weight.numel() == 0:
                return self._cannot_fuse("the LM head's weight is empty outside the forward (sharded by an "
                                         "engine other than ZeRO-3 / FSDP)")
            return head
        if any(p.requires_grad for p in head.parameters()):
            return TrainedShardedHead(head, "zero3" if zero3 else "dtensor" if dtensor else "fsdp1")
        full_heads = self.__dict__.setdefault("_full_heads", {})
        if id(head.weight) not in full_heads:
            if zero3:
                import deepspeed

                gathered = deepspeed.zero.GatheredParameters(list(head.parameters()), modifier_rank=None)
            else:
                gathered = vllm_sampling.full_root_params(module, self.accelerator)     # FSDP1; else a no-op
            with torch.no_grad(), gathered:
                weight, bias = head.weight, head.bias
                if dtensor:
                    weight, bias = weight.full_tensor(), None if bias is None else bias.full_tensor()
                copy_ = torch.nn.Linear(head.in_features, head.out_features, bias=bias is not None, device="meta")
                copy_.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
                if bias is not None:
                    copy_.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
            if copy_.weight.shape != (head.out_features, head.in_features):
                return self._cannot_fuse(f"the sharded LM head could not be gathered (got {tuple(copy_.weight.shape)})")
            full_heads[id(head.weight)] = copy_
        return full_heads[id(head.weight)]

    def _cannot_fuse(self, reason: str) -> None:
        """None, saying once per reason why the fused LM head is off."""
        warned = self.__dict__.setdefault("_fuse_warned", set())
        if reason not in warned:
            warned.add(reason)
            log.warning("msd.fused_lm_head: %s, so full [B, R, V] logits are used", reason)
        return None

    def _mlc(self, model: Any, examples: list[dict[str, Any]], num_items_in_batch: Any) -> torch.Tensor | float:
        """lambda * L_MLC on its schedule (scaled like the MSD loss under accumulation), else 0."""
        inputs = self._mlc_inputs(examples) if self.mlc_term.active(self.state.global_step) else None
        if inputs is not None:
            return self.mlc_term(self.accelerator.unwrap_model(model), inputs, accumulation_scale(self, num_items_in_batch))
        # DDP reduces every parameter every step: the head joins with an exactly-zero gradient (a single
        # process skips it: a zero gradient would still move the head through AdamW's moments and decay).
        return self.mlc_term.zero() if self.accelerator.num_processes > 1 else 0.0

    def _mlc_inputs(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor] | None:
        """The ``mlc_*`` batch: each distinct prompt of the batch (harmful and benign) in English and
        every student language; prompts missing one of them are left out (None when none is left)."""
        langs = [self.msd.teacher_language, *self.msd.student_languages]
        tok, cut = self.processing_class, self.msd.max_prompt_tokens
        prompts = {e["prompt_id"]: e["texts"] for e in examples if all(c in e["texts"] for c in langs)}
        if not prompts:
            return None
        variants = [prompt_ids(tok, texts[c], max_tokens=cut) for texts in prompts.values() for c in langs]   # B * L
        return {k: v.to(self.accelerator.device) for k, v in variant_inputs(variants, len(langs), tok.pad_token_id).items()}

    @torch.no_grad()
    def _record(self, examples, responses, d, raw, mask, per_seq, valid, benign, seconds: float) -> None:
        """Sums and counts of this rank's items (:class:`MetricSums`): the logged values are means over
        every item of every rank. dpsw_raw_weight: per response token; response_length, loss/<kind>,
        divergence/<lang>, fidelity/<lang>: per sequence; tokens_per_second: per process."""
        n = mask.sum(-1)
        m = self._metrics
        m.add("dpsw_raw_weight", float(raw[mask].sum()), float(mask.sum()))
        m.add("response_length", float(n.sum()), len(n))
        m.add("tokens_per_second", float(n.sum()), max(seconds, 1e-9))
        for name, rows in (("harmful", valid & ~benign), ("benign", valid & benign)):
            if rows.any():                            # unweighted mean per-sequence loss of each kind
                m.add(f"loss/{name}", float(per_seq[rows].sum()), float(rows.sum()))
        texts = self.processing_class.batch_decode(responses, skip_special_tokens=True)
        for e, row_d, row_m, text in zip(examples, d, mask, texts):
            if row_m.any():
                m.add(f"divergence/{e['lang']}", float(row_d[row_m].mean()))
            m.add(f"fidelity/{e['lang']}", float(in_language(text, e["lang"])))   # y in the query's language

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Flush the MSD metrics gathered since the last log: means over every rank's items (every rank
        # logs at the same steps, so the reductions line up).
        if "loss" in logs:
            logs.update(self._metrics.reduce(self.accelerator))
            logs.update(self._once)                         # teacher-gating counts, once
            self._once = {}
            if self.mlc_term is not None:
                self.mlc_term.flush(logs, self.accelerator)
        super().log(logs, start_time)
