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

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from polyalign.data.records import ParallelRecord
from polyalign.losses.mlc import MLCHead, mean_pairwise_cosine, mlc_loss, top_singular_share
from polyalign.models.batching import left_pad, length_buckets
from polyalign.models.chat import prompt_ids
from polyalign.train.mlc_config import MLCConfig
from polyalign.train.preference_trainer import reference_free_trainer_class

HEAD_FILE = "mlc_head.safetensors"


class MLCCollator:
    """Wraps the trainer's own collator; pads each example's L prompt variants next to the batch."""

    def __init__(self, base: Any, pad_token_id: int):
        self.base, self.pad_token_id = base, pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        variants = [ids for ex in examples for ids in ex["mlc_prompt_ids"]]      # B * L prompts
        n_lang = len(examples[0]["mlc_prompt_ids"])
        batch = self.base([{k: v for k, v in ex.items() if k != "mlc_prompt_ids"} for ex in examples])
        ids, mask, pos = left_pad(variants, self.pad_token_id)
        batch.update(mlc_input_ids=ids, mlc_attention_mask=mask, mlc_position_ids=pos,
                     mlc_num_languages=torch.tensor(n_lang))
        return batch


def prompt_representations(model: Any, head: MLCHead, inputs: dict[str, Any], layer: int | None) -> torch.Tensor:
    """[B, L, D]: layer-k hidden state at each variant's last prompt token, through the head.

    Variants run in length buckets (:func:`length_buckets`): left padding keeps each row's real
    tokens at the right end, so a bucket is the last ``m`` columns of its rows.
    """
    ids, mask, pos = inputs["mlc_input_ids"], inputs["mlc_attention_mask"], inputs["mlc_position_ids"]
    lengths = mask.sum(-1).tolist()
    rows, states = [], []
    for group in length_buckets(lengths):
        m = max(lengths[i] for i in group)
        idx = torch.tensor(group, device=ids.device)
        out = model(input_ids=ids[idx, -m:], attention_mask=mask[idx, -m:], position_ids=pos[idx, -m:],
                    output_hidden_states=True, use_cache=False, logits_to_keep=1)
        states.append(out.hidden_states[-1 if layer is None else layer][:, -1])   # last column = last token
        rows.extend(group)
    h = torch.cat(states)[torch.argsort(torch.tensor(rows, device=ids.device))]  # back to collator order
    L = int(inputs["mlc_num_languages"])
    r = head(h)                                                                   # [B*L, D]
    return r.view(-1, L, r.shape[-1])


class MLCMixin:
    """Adds the MLC term to ``super().compute_loss``. Put it first in the bases."""

    def setup_mlc(self, mlc_config: MLCConfig, hidden_size: int) -> None:
        self.mlc = mlc_config
        self.mlc_head = MLCHead(hidden_size, mlc_config.dim, mlc_config.projection, seed=self.args.seed).to(self.args.device)
        # The head is a submodule of the policy, so the optimizer, DDP/DeepSpeed and device moves
        # all see it without special cases. PEFT leaves modules added after wrapping trainable.
        self.model.mlc_head = self.mlc_head
        self.data_collator = MLCCollator(self.data_collator, self.processing_class.pad_token_id)
        self.add_callback(MLCHeadCheckpoint(self.mlc_head))
        self._mlc_metrics: dict[str, list[float]] = defaultdict(list)

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
        # Official schedule: the MLC term on every `every`-th optimizer step (step 0 included).
        if model.training and self.mlc.weight > 0 and self.state.global_step % self.mlc.every == 0:
            # The unwrapped module: a second forward through the DDP wrapper before one backward is
            # not allowed; gradients still reach every parameter and DDP reduces them once.
            reps = prompt_representations(self.accelerator.unwrap_model(model), self.mlc_head, mlc_inputs,
                                          self.mlc.layer)
            l_mlc = mlc_loss(reps, self.mlc.tau)
            loss = loss + self.mlc.weight * l_mlc
            self._mlc_metrics["mlc/loss"].append(float(l_mlc.detach()))
            self._mlc_metrics["mlc/top_singular_share"].append(float(top_singular_share(reps.detach())))
            self._mlc_metrics["mlc/pairwise_cosine"].append(float(mean_pairwise_cosine(reps.detach())))
        elif model.training and self.accelerator.num_processes > 1:
            # DDP reduces every parameter every step: on steps without the MLC term the head joins
            # with an exactly-zero gradient (single-process runs skip this, as the official code does).
            loss = loss + 0.0 * sum(p.sum() for p in self.mlc_head.parameters())
        return (loss, result[1]) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._mlc_metrics and "loss" in logs:
            logs.update({k: round(sum(v) / len(v), 6) for k, v in self._mlc_metrics.items()})
            self._mlc_metrics.clear()
        super().log(logs, start_time)


class MLCHeadCheckpoint(TrainerCallback):
    """Saves the MLC head (safetensors) into each ``checkpoint-N`` and loads it back on ``--resume``.

    Trainer saves only the adapter of a PEFT model, and the head is not part of the adapter; a
    callback does this through Trainer's public hooks instead of overriding its private methods.
    """

    def __init__(self, head: torch.nn.Module):
        self.head = head

    def _file(self, args: Any, step: int) -> Path:
        return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}" / HEAD_FILE

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
                      str(self._file(args, state.global_step)))

    def on_train_begin(self, args, state, control, **kwargs):
        # On resume Trainer has restored global_step from checkpoint-N before this hook runs.
        f = self._file(args, state.global_step)
        if state.global_step > 0 and f.exists():
            self.head.load_state_dict(load_file(str(f), device=str(args.device)))


def _trl_classes():
    from trl import DPOTrainer, SFTTrainer

    class MLCDPOTrainer(MLCMixin, DPOTrainer):
        """TRL's DPOTrainer + MLC."""

    class MLCSFTTrainer(MLCMixin, SFTTrainer):
        """TRL's SFTTrainer + MLC."""

    class MLCPreferenceTrainer(MLCMixin, reference_free_trainer_class()):
        """SimPO / ORPO on TRL's DPOTrainer pipeline + MLC."""

    return MLCDPOTrainer, MLCSFTTrainer, MLCPreferenceTrainer


def mlc_rows(records: list[ParallelRecord], cfg: MLCConfig, tokenizer: Any) -> list[dict[str, Any]]:
    """Rows for TRL (conversational prompt/chosen/rejected or prompt/completion) + ``mlc_prompt_ids``.

    Records need an English prompt, the English response(s) in ``meta`` (``chosen``/``rejected`` for
    DPO, ``output`` for SFT) and the prompt in every language of ``cfg.languages``.
    """
    rows = []
    for r in records:
        if any(lang not in r.texts for lang in cfg.languages):
            continue
        row: dict[str, Any] = {"prompt": [{"role": "user", "content": r.texts["en"]}],
                               "mlc_prompt_ids": [prompt_ids(tokenizer, r.texts[lang])[-cfg.max_length:]
                                                  for lang in cfg.languages]}
        if cfg.paradigm == "sft":
            if "output" not in r.meta:
                continue
            row["completion"] = [{"role": "assistant", "content": r.meta["output"]}]
        else:
            if "chosen" not in r.meta or "rejected" not in r.meta:
                continue
            row["chosen"] = [{"role": "assistant", "content": r.meta["chosen"]}]
            row["rejected"] = [{"role": "assistant", "content": r.meta["rejected"]}]
        rows.append(row)
    return rows


def build_mlc_trainer(recipe: Any, model: Any, tokenizer: Any, records: list[ParallelRecord], args: Any) -> Any:
    """The TRL trainer for ``recipe.mlc.paradigm`` with MLC attached."""
    import dataclasses

    from datasets import Dataset
    from trl import DPOConfig, SFTConfig

    from polyalign.errors import PolyalignError

    cfg = MLCConfig(**(recipe.mlc or {}))
    rows = mlc_rows(records, cfg, tokenizer)
    if not rows:
        raise PolyalignError(f"no rows with English responses and prompts in all of {cfg.languages}")
    MLCDPOTrainer, MLCSFTTrainer, MLCPreferenceTrainer = _trl_classes()
    base = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
    base["remove_unused_columns"] = False
    if base.get("ddp_find_unused_parameters") is None:
        base["ddp_find_unused_parameters"] = False  # every parameter gets a gradient each step (see compute_loss)
    if cfg.paradigm == "dpo":
        targs = DPOConfig(**base, beta=cfg.beta, loss_type=["sigmoid"], max_length=cfg.max_length)
        trainer = MLCDPOTrainer(model=model, args=targs, train_dataset=Dataset.from_list(rows),
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
