"""SimPO and ORPO on TRL's stable DPOTrainer: its tokenisation, collator and logging, our loss.

Both losses are reference-free. Stable TRL has no SimPO/ORPO trainer outside
``trl.experimental``, so :func:`reference_free_trainer_class` subclasses ``DPOTrainer`` and
overrides ``compute_loss`` only (plus one hook so that no reference model is loaded):

    Trainer = reference_free_trainer_class()
    trainer = Trainer(model=model, args=DPOConfig(..., precompute_ref_log_probs=True),
                      train_dataset=ds, processing_class=tok, preference_loss="simpo", beta=2.0, gamma=0.5)
"""

from __future__ import annotations

from typing import Any

import torch

from polyalign.losses.preference import orpo_loss, simpo_loss

PREFERENCE_LOSSES = ("simpo", "orpo")


def completion_logps(model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability and token count of each completion in a DPO batch ([chosen; rejected]).

    Uses the fused LM head DPOTrainer installs (``fused_lm_head=True``): per-token log-probs
    without materialising ``[B, T, V]`` logits.
    """
    mask = inputs["completion_mask"]
    model_kwargs = {k: v for k, v in inputs.items() if k not in ("completion_mask", "ref_chosen_logps",
                                                                 "ref_rejected_logps")}
    labels = inputs["input_ids"].masked_fill(mask == 0, -100)
    out = model(**model_kwargs, labels=labels, fused_lm_head=True, use_cache=False)
    shift_mask = mask[:, 1:]
    per_token = out.log_probs[:, -shift_mask.shape[1]:] * shift_mask
    return per_token.sum(dim=1), shift_mask.sum(dim=1).to(per_token.dtype)


def reference_free_trainer_class():
    """``DPOTrainer`` subclass computing SimPO or ORPO (imported lazily: TRL is heavy)."""
    from trl import DPOTrainer

    class ReferenceFreePreferenceTrainer(DPOTrainer):
        """TRL's DPOTrainer pipeline with a reference-free loss (``simpo`` | ``orpo``)."""

        def __init__(self, *args: Any, preference_loss: str, beta: float, gamma: float = 0.5, **kwargs: Any):
            if preference_loss not in PREFERENCE_LOSSES:
                raise ValueError(f"preference_loss must be one of {PREFERENCE_LOSSES}, got {preference_loss!r}")
            self.preference_loss, self.pref_beta, self.pref_gamma = preference_loss, beta, gamma
            super().__init__(*args, **kwargs)
            # `precompute_ref_log_probs=True` stops DPOTrainer from loading a reference copy; nothing
            # reads reference log-probs here, so turn the flag off for evaluate() too.
            self.precompute_ref_logps = False

        def _precompute_ref_logps(self, dataset, name, batch_size):
            return dataset                      # reference-free: no reference pass

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            logps, lens = completion_logps(model, inputs)
            chosen, rejected = logps.chunk(2)
            n_chosen, n_rejected = lens.chunk(2)
            if self.preference_loss == "simpo":
                loss = simpo_loss(chosen, rejected, n_chosen, n_rejected, self.pref_beta, self.pref_gamma)
            else:
                loss = orpo_loss(chosen, rejected, n_chosen, n_rejected, self.pref_beta)
            with torch.no_grad():                   # implicit rewards: beta * mean log-prob
                r_w = self.pref_beta * chosen / n_chosen.clamp(min=1)
                r_l = self.pref_beta * rejected / n_rejected.clamp(min=1)
                gathered = self.accelerator.gather_for_metrics(torch.stack([r_w, r_l, chosen, rejected]).T)
            m = self._metrics[mode]
            m["rewards/chosen"].append(gathered[:, 0].mean().item())
            m["rewards/rejected"].append(gathered[:, 1].mean().item())
            m["rewards/margins"].append((gathered[:, 0] - gathered[:, 1]).mean().item())
            m["rewards/accuracies"].append((gathered[:, 0] > gathered[:, 1]).float().mean().item())
            m["logps/chosen"].append(gathered[:, 2].mean().item())
            m["logps/rejected"].append(gathered[:, 3].mean().item())
            return (loss, {}) if return_outputs else loss

    return ReferenceFreePreferenceTrainer
