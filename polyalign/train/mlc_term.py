"""The MLC term ``lambda * L_MLC`` as a part any trainer adds to its loss (METHODS.md section 1).

Shared by :class:`polyalign.train.mlc_trainer.MLCMixin` (MLC next to SFT / DPO / SimPO / ORPO) and
:class:`polyalign.train.msd_trainer.MSDTrainer` (MSD + MLC in one objective): the prompt-variant
batch, the bucketed forward to the layer-k hidden state, the head, the official every-k schedule,
the gradient-accumulation scale and the metrics live here once.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from polyalign.losses.mlc import MLCHead, mean_pairwise_cosine, mlc_loss, top_singular_share
from polyalign.models.batching import left_pad, length_buckets
from polyalign.train.mlc_config import MLCConfig

HEAD_FILE = "mlc_head.safetensors"


def variant_inputs(variants: list[list[int]], num_languages: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """B * L prompt variants (language-major within each example) -> the ``mlc_*`` tensors [B * L, T]."""
    ids, mask, pos = left_pad(variants, pad_token_id)
    return {"mlc_input_ids": ids, "mlc_attention_mask": mask, "mlc_position_ids": pos,
            "mlc_num_languages": torch.tensor(num_languages)}


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


def accumulation_scale(trainer: Any, num_items_in_batch: Any) -> float:
    """What an extra term added inside ``compute_loss`` must be multiplied by under accumulation.

    ``Trainer.training_step`` divides the returned loss by the accumulation steps unless the base
    loss is already normalised over the whole window (TRL's SFT: summed token losses over
    ``num_items_in_batch``). In that case a per-micro-batch mean added to it would be summed over the
    window, i.e. weighted ``steps`` times too much; dividing it here gives every term the same scale.
    Mirrors the rule of ``Trainer.training_step`` (transformers 5.x).
    """
    scaled = trainer.loss_is_scaled_for_ga
    if scaled is None:
        scaled = (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
            trainer.compute_loss_func is not None
    steps = getattr(trainer, "current_gradient_accumulation_steps", trainer.args.gradient_accumulation_steps)
    return 1.0 / steps if scaled else 1.0


class MLCTerm:
    """``lambda * L_MLC`` on the official schedule, with its head and metrics.

    The head is registered as a submodule of the policy (``model.mlc_head``), so the optimizer,
    DDP/DeepSpeed and device moves see it without special cases; PEFT leaves modules added after
    wrapping trainable.
    """

    def __init__(self, cfg: MLCConfig, model: Any, hidden_size: int, seed: int, device: Any):
        self.cfg = cfg
        self.head = MLCHead(hidden_size, cfg.dim, cfg.projection, seed=seed).to(device)
        model.mlc_head = self.head
        self.metrics: dict[str, list[float]] = defaultdict(list)

    def active(self, global_step: int) -> bool:
        """Official schedule: the term on every ``every``-th optimizer step (step 0 included)."""
        return self.cfg.weight > 0 and global_step % self.cfg.every == 0

    def __call__(self, model: Any, inputs: dict[str, Any], scale: float = 1.0) -> torch.Tensor:
        """``scale * lambda * L_MLC`` for the ``mlc_*`` inputs; ``model`` is the unwrapped policy (a second
        forward through the DDP wrapper before one backward is not allowed; DDP still reduces once)."""
        reps = prompt_representations(model, self.head, inputs, self.cfg.layer)   # [B, L, D]
        loss = mlc_loss(reps, self.cfg.tau)
        self.metrics["mlc/loss"].append(float(loss.detach()))
        self.metrics["mlc/top_singular_share"].append(float(top_singular_share(reps.detach())))
        self.metrics["mlc/pairwise_cosine"].append(float(mean_pairwise_cosine(reps.detach())))
        return scale * self.cfg.weight * loss

    def zero(self) -> torch.Tensor:
        """0 that touches the head: under DDP every parameter must get a gradient every step."""
        return 0.0 * sum(p.sum() for p in self.head.parameters())

    def flush(self, logs: dict[str, float]) -> None:
        """Mean of each metric since the last log into ``logs``."""
        logs.update({k: round(sum(v) / len(v), 6) for k, v in self.metrics.items()})
        self.metrics.clear()


def save_head(head: torch.nn.Module, checkpoint: Path) -> None:
    """Trainer saves only the adapter for PEFT models: the head goes next to it (safetensors)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
              str(Path(checkpoint) / HEAD_FILE))


def load_head(head: torch.nn.Module, checkpoint: Path) -> None:
    from safetensors.torch import load_file

    f = Path(checkpoint) / HEAD_FILE
    if f.exists():
        device = next(head.parameters(), torch.empty(0)).device
        head.load_state_dict(load_file(str(f), device=str(device)))


class MLCHeadCheckpoint(TrainerCallback):
    """Saves the MLC head into each ``checkpoint-N`` and loads it back on ``--resume``, through
    Trainer's public callback hooks rather than overriding its private save/load methods."""

    def __init__(self, head: torch.nn.Module):
        self.head = head

    def _dir(self, args: Any, step: int) -> Path:
        return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            save_head(self.head, self._dir(args, state.global_step))

    def on_train_begin(self, args, state, control, **kwargs):
        # On resume Trainer has restored global_step from checkpoint-N before this hook runs.
        if state.global_step > 0:
            load_head(self.head, self._dir(args, state.global_step))
