"""The MLC term ``lambda * L_MLC`` as a part any trainer adds to its loss (METHODS.md section 1).

Shared by :class:`polyalign.train.mlc_trainer.MLCMixin` (MLC next to SFT / DPO / SimPO / ORPO) and
:class:`polyalign.train.msd_trainer.MSDTrainer` (MSD + MLC in one objective): the prompt-variant
batch, the bucketed forward to the layer-k hidden state, the head, the official every-k schedule,
the gradient-accumulation scale and the metrics live here once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from polyalign.losses.mlc import MLCHead, mean_pairwise_cosine, mlc_loss, top_singular_share
from polyalign.models.batching import final_hidden_forward, left_pad, length_buckets
from polyalign.train.metrics import MetricSums
from polyalign.train.mlc_config import MLCConfig

HEAD_FILE = "mlc_head.safetensors"
HEAD_ATTRIBUTE = "mlc_head"          # the head's name as a submodule of the policy


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
        rows_in = {"input_ids": ids[idx, -m:], "attention_mask": mask[idx, -m:], "position_ids": pos[idx, -m:],
                   "logits_to_keep": 1}
        if layer is None:                     # the final state only: no tuple of every layer's states
            states.append(final_hidden_forward(model, **rows_in)[1][:, -1])      # last column = last token
        else:
            out = model(**rows_in, output_hidden_states=True, use_cache=False)
            states.append(out.hidden_states[layer][:, -1])
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
        setattr(model, HEAD_ATTRIBUTE, self.head)
        self.metrics = MetricSums()

    def active(self, global_step: int) -> bool:
        """Official schedule: the term on every ``every``-th optimizer step (step 0 included)."""
        return self.cfg.weight > 0 and global_step % self.cfg.every == 0

    def __call__(self, model: Any, inputs: dict[str, Any], scale: float = 1.0) -> torch.Tensor:
        """``scale * lambda * L_MLC`` for the ``mlc_*`` inputs; ``model`` is the unwrapped policy (a second
        forward through the DDP wrapper before one backward is not allowed; DDP still reduces once)."""
        reps = prompt_representations(model, self.head, inputs, self.cfg.layer)   # [B, L, D]
        loss = mlc_loss(reps, self.cfg.tau)
        self.metrics.add("mlc/loss", float(loss.detach()))
        self.metrics.add("mlc/top_singular_share", float(top_singular_share(reps.detach())))
        self.metrics.add("mlc/pairwise_cosine", float(mean_pairwise_cosine(reps.detach())))
        return scale * self.cfg.weight * loss

    def zero(self) -> torch.Tensor:
        """0 that touches the head: under DDP every parameter must get a gradient every step."""
        return 0.0 * sum(p.sum() for p in self.head.parameters())

    def flush(self, logs: dict[str, float], accelerator: Any) -> None:
        """Mean of each metric since the last log, over every rank's steps, into ``logs``. Collective:
        every rank calls it on every logging step."""
        logs.update(self.metrics.reduce(accelerator))


def gathered_state(head: torch.nn.Module, accelerator: Any, wrapped_model: Any) -> dict[str, torch.Tensor]:
    """The head's full weights (CPU) on the main process, whatever shards them. Collective: call it on
    every rank. ZeRO-3: its partitions gathered (``GatheredParameters``); FSDP 1 or 2: the full state
    dict of the wrapped policy, which holds the head as ``mlc_head.*`` (torch's ``get_model_state_dict``,
    as accelerate's ``get_state_dict`` for FSDP2; other ranks may get nothing); otherwise the head as
    it is. Each rank's ``head.state_dict()`` under a sharding engine is its shard: zero-sized or partial
    tensors were saved."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # offloading to the CPU (rank 0 only) is what saves GPU memory; on a CPU-only gloo group torch
        # 2.13 segfaults in it (accelerate's FSDP1 get_state_dict always offloads)
        offload = accelerator.device.type != "cpu"
        full = get_model_state_dict(wrapped_model, options=StateDictOptions(full_state_dict=True, cpu_offload=offload))
        marker = f"{HEAD_ATTRIBUTE}."
        return {k.split(marker, 1)[1]: v.detach().cpu().contiguous() for k, v in full.items() if marker in k}
    params = list(head.parameters())
    if any(hasattr(p, "ds_id") for p in params):                     # ZeRO-3 partitioned
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
    return {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}


def save_head(state: dict[str, torch.Tensor], checkpoint: Path) -> None:
    """Trainer saves only the adapter for PEFT models: the head's gathered weights (:func:`gathered_state`)
    go next to it (safetensors)."""
    from safetensors.torch import save_file

    save_file(state, str(Path(checkpoint) / HEAD_FILE))


def load_head(head: torch.nn.Module, checkpoint: Path, accelerator: Any = None, wrapped_model: Any = None) -> bool:
    """Load the head saved by :func:`save_head` back (``--resume``); False when the checkpoint has none.
    Collective under a sharding engine (call it on every rank; each reads the file): ZeRO-3 loads it
    inside ``GatheredParameters(modifier_rank=0)``, which re-partitions rank 0's values; FSDP 1 or 2
    through torch's ``set_model_state_dict`` on the wrapped policy (full state dict in, shards kept).
    A plain ``load_state_dict`` there fails on the shards' sizes: what ``--resume`` did before."""
    from safetensors.torch import load_file

    f = Path(checkpoint) / HEAD_FILE
    if not f.exists():
        return False
    state = load_file(str(f))
    if accelerator is not None:
        from accelerate.utils import DistributedType

        if accelerator.distributed_type == DistributedType.FSDP:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            full = {f"{HEAD_ATTRIBUTE}.{k}": v for k, v in state.items()}
            set_model_state_dict(wrapped_model, full, options=StateDictOptions(full_state_dict=True, strict=False))
            return True
    params = list(head.parameters())
    if any(hasattr(p, "ds_id") for p in params):                     # ZeRO-3 partitioned
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            head.load_state_dict({k: v.to(params[0].device) for k, v in state.items()})
        return True
    device = next(head.parameters(), torch.empty(0)).device
    head.load_state_dict({k: v.to(device) for k, v in state.items()})
    return True


class MLCHeadCheckpoint(TrainerCallback):
    """Saves the MLC head into each ``checkpoint-N`` and loads it back on ``--resume``, through
    Trainer's public callback hooks rather than overriding its private save/load methods. ``trainer``
    gives the accelerator and wrapped model that gather the head under ZeRO-3 / FSDP."""

    def __init__(self, head: torch.nn.Module, trainer: Any = None):
        self.head, self.trainer = head, trainer

    def _dir(self, args: Any, step: int) -> Path:
        return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"

    def on_save(self, args, state, control, **kwargs):
        # every rank gathers (a collective), the first writes
        head_state = gathered_state(self.head, self.trainer.accelerator, self.trainer.model_wrapped) if self.trainer \
            else {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        if state.is_world_process_zero:
            save_head(head_state, self._dir(args, state.global_step))

    def on_train_begin(self, args, state, control, **kwargs):
        # On resume Trainer has restored global_step from checkpoint-N before this hook runs.
        if state.global_step > 0:
            t = self.trainer
            load_head(self.head, self._dir(args, state.global_step), t.accelerator if t else None,
                      t.model_wrapped if t else None)
