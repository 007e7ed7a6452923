"""2-process (gloo) checks of the training side under `accelerate launch` (tests/test_scale_train.py).

    accelerate launch --multi_gpu --num_processes 2 tests/scale_worker.py MODE OUT_DIR

MODE
    gate_metrics  teacher gating split across ranks, then MSD and MLC metrics recorded on each rank and
                  logged once; every rank writes OUT_DIR/rank<N>.json with what it probed and logged.
    train         run_recipe (MSD + MLC term, LoRA, 2 steps, checkpoint at step 2) into OUT_DIR/run.
    fsdp_head     the tiny policy with an MLC head wrapped in torch FSDP (FULL_SHARD) on gloo: the
                  head's local state (this rank's shard) and gathered_state's, in OUT_DIR/rank<N>.pt.
    fsdp_trained_head
                  full fine-tuning's fused head under torch FSDP (FULL_SHARD, one root unit) on gloo:
                  the student's forward, TrainedShardedHead and the fused divergence inside the
                  wrapper's forward (TRL's _ForwardRedirection); loss and full gradients against a
                  one-process full-logits reference, in OUT_DIR/rank<N>.pt.
"""

import json
import sys
from pathlib import Path

import torch

mode, out = sys.argv[1], Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
SPEC = "builtin:tiny-random"


def gate_metrics() -> None:
    from polyalign.models import LoraSettings, attach_lora, load_model, load_tokenizer
    from polyalign.train.mlc_config import MLCConfig
    from polyalign.train.msd_config import MSDConfig
    from polyalign.train.msd_trainer import MSDTrainer, build_msd_examples
    from polyalign.train.recipes import Recipe, load_prompts, training_arguments

    probed: list[list[int]] = []
    original = MSDTrainer.sample_responses

    def counting(self, model, prompts, from_teacher, greedy=False, max_new_tokens=None):
        if greedy:                                            # the gating probe
            probed.extend(prompts)
        return original(self, model, prompts, from_teacher, greedy=greedy, max_new_tokens=max_new_tokens)

    MSDTrainer.sample_responses = counting
    model = attach_lora(load_model(SPEC), LoraSettings(r=4, alpha=8))
    cfg = MSDConfig(student_languages=["th", "sw"], max_new_tokens=4, teacher_gating=True, gating_max_new_tokens=4)
    # the random model refuses nothing: gating drops the harmful prompts and keeps the benign ones
    records = load_prompts("builtin:all", None, "train", None)
    records = [r for r in records if r.category == "harmful"][:3] + [r for r in records if r.category == "benign"][:3]
    examples = build_msd_examples(records, cfg)
    r = Recipe(method="msd", model=SPEC, output_dir=str(out / "run"),
               training={"max_steps": 1, "per_device_train_batch_size": 2, "disable_tqdm": True})
    trainer = MSDTrainer(model, training_arguments(r), cfg, examples, load_tokenizer(SPEC),
                         mlc_config=MLCConfig(languages=["en", "th", "sw"], dim=8))
    rank = trainer.accelerator.process_index
    # Each rank records its own items: rank 0 has harmful th rows only, rank 1 a benign sw row too.
    ex = [{"lang": "th", "benign": False}, {"lang": "th", "benign": False}] if rank == 0 else \
        [{"lang": "th", "benign": False}, {"lang": "sw", "benign": True}, {"lang": "sw", "benign": True}]
    n = len(ex)
    d = torch.arange(1, n * 3 + 1, dtype=torch.float32).view(n, 3) * (rank + 1)      # per-token divergence
    mask = torch.ones(n, 3, dtype=torch.bool)
    mask[0, 2] = False
    per_seq = (d * mask).sum(-1) / mask.sum(-1)
    benign = torch.tensor([e["benign"] for e in ex])
    responses = [[5, 6, 7]] * n
    trainer._metrics.clear()
    trainer._record(ex, responses, d, torch.full((n, 3), 0.5), mask, per_seq, torch.ones(n, dtype=torch.bool),
                    benign, 1.0)
    trainer.mlc_term.metrics.add("mlc/loss", 1.0 + rank * 2)          # rank 0: 1.0, rank 1: 3.0
    if rank == 1:
        trainer.mlc_term.metrics.add("mlc/loss", 5.0)
    logs = {"loss": 0.0}
    trainer.log(logs)
    items = {"loss/harmful": per_seq[~benign].tolist(), "loss/benign": per_seq[benign].tolist(),
             **{f"divergence/{lang}": [float(row[m].mean()) for e, row, m in zip(ex, d, mask) if e["lang"] == lang]
                for lang in ("th", "sw")}}
    (out / f"rank{rank}.json").write_text(json.dumps({
        "probed": probed, "logs": logs, "items": items, "dataset": [(e["prompt_id"], e["lang"]) for e in
                                                                     trainer.train_dataset],
        "examples": len(examples)}))


def train() -> None:
    from polyalign.train.recipes import DataSettings, Recipe, run_recipe

    r = Recipe(method="msd", model=SPEC, output_dir=str(out / "run"), lora={"r": 4, "alpha": 8},
               data=DataSettings(source="builtin:harmful", limit=4),
               msd={"student_languages": ["th"], "max_new_tokens": 4, "temperature": 0, "mode": "off_policy"},
               mlc={"weight": 0.5, "every": 1, "dim": 8},
               training={"max_steps": 2, "learning_rate": 1e-2, "per_device_train_batch_size": 1, "save_steps": 2,
                         "disable_tqdm": True})
    run_recipe(r)


def fsdp_head() -> None:
    import torch.distributed as dist
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import FullyShardedDataParallel

    from polyalign.losses.mlc import MLCHead
    from polyalign.models.builtin import build_tiny_model
    from polyalign.train.mlc_term import HEAD_ATTRIBUTE, gathered_state, load_head, save_head

    accelerator = Accelerator(cpu=True)
    # accelerate runs FSDP on accelerators only (on a CPU it quietly falls back to plain DDP); the
    # sharding itself is torch's and works over gloo, so wrap with torch FSDP and tell accelerate so.
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=1, state_dict_type="FULL_STATE_DICT")
    model = build_tiny_model()
    head = MLCHead(64, 16, "linear", seed=3)
    setattr(model, HEAD_ATTRIBUTE, head)
    full = {k: v.clone() for k, v in head.state_dict().items()}
    wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    local = {k: v.detach().clone() for k, v in head.state_dict().items()}
    gathered = gathered_state(head, accelerator, wrapped)
    # --resume: a checkpoint's head (other values) loaded back into the shards, then gathered again
    saved = {k: v + 1.0 for k, v in full.items()}
    if dist.get_rank() == 0:
        save_head(saved, out)
    dist.barrier()
    loaded = load_head(head, out, accelerator, wrapped)
    reloaded = gathered_state(head, accelerator, wrapped)
    torch.save({"full": full, "local": local, "gathered": gathered, "saved": saved, "loaded": loaded,
                "reloaded": reloaded}, out / f"rank{dist.get_rank()}.pt")


def fsdp_trained_head() -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel
    from trl.models.utils import _ForwardRedirection

    from polyalign.losses.msd import fused_token_divergence, token_divergence
    from polyalign.models.builtin import build_tiny_model
    from polyalign.train.msd_trainer import TrainedShardedHead

    dist.init_process_group("gloo")
    student, teacher = build_tiny_model(seed=0), build_tiny_model(seed=1).requires_grad_(False)
    reference = build_tiny_model(seed=0)                       # the same start, never sharded
    ids = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(5))
    weights = torch.rand(2, 7, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        h_t, t_logits = teacher.model(input_ids=ids).last_hidden_state, teacher(input_ids=ids).logits
    ref_loss = (token_divergence(reference(input_ids=ids).logits, t_logits, "reverse_kl") * weights).sum()
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in reference.named_parameters()}

    wrapped = FullyShardedDataParallel(student, device_id=torch.device("cpu"), use_orig_params=True)
    head = TrainedShardedHead(student.lm_head, "fsdp1")
    outside = tuple(student.lm_head.weight.shape)              # this rank's shard of the flat parameter

    def loss_inside(model):
        h = model.model(input_ids=ids).last_hidden_state
        with head.full() as (w, b):
            d, _ = fused_token_divergence(h, h_t, w, b, "reverse_kl", teacher_weight=teacher.lm_head.weight)
        return (d * weights).sum()

    loss = _ForwardRedirection()(wrapped, student, loss_inside, student)
    loss.backward()
    with FullyShardedDataParallel.summon_full_params(wrapped, with_grads=True):
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    torch.save({"loss": loss.detach(), "ref_loss": ref_loss.detach(), "grads": grads, "ref_grads": ref_grads,
                "outside": outside}, out / f"rank{dist.get_rank()}.pt")


{"gate_metrics": gate_metrics, "train": train, "fsdp_head": fsdp_head,
 "fsdp_trained_head": fsdp_trained_head}[mode]()

# Leave the process group explicitly: gloo's threads left running at interpreter exit aborted a rank
# once ("terminate called without an active exception", exit -6) after all its work was done.
if torch.distributed.is_available() and torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
