"""Training in bf16 (issue #13): LoRA weights and optimizer state stay fp32 on a bf16 base, full
fine-tuning uses fp32 master weights with bf16 autocast, the losses upcast inside, and a bf16 run's
loss curve follows the fp32 run's."""

import math

import pytest
import torch

from polyalign.losses.mlc import mlc_loss
from polyalign.models import LoraSettings, attach_lora, load_model, load_tokenizer
from polyalign.train.msd_config import MSDConfig
from polyalign.train.msd_trainer import MSDTrainer, build_msd_examples
from polyalign.train.recipes import Recipe, load_prompts, precision, training_arguments

SPEC = "builtin:tiny-random"


def test_lora_on_a_bf16_base_keeps_adapter_and_optimizer_state_fp32(tmp_path):
    model = attach_lora(load_model(SPEC, dtype="bfloat16"), LoraSettings(r=4, alpha=8))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if not p.requires_grad)
    opt = torch.optim.AdamW(trainable.values(), lr=1e-3)
    x = torch.randint(0, 100, (2, 8))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())


def test_precision_policy_for_lora_and_full_fine_tuning():
    lora = Recipe(method="msd", model=SPEC, output_dir="x", dtype="bfloat16")
    full = Recipe(method="msd", model=SPEC, output_dir="x", dtype="bfloat16", lora=None)
    assert precision(lora) == ("bfloat16", False)          # frozen bf16 base, fp32 adapter
    assert precision(full) == ("float32", True)            # fp32 master weights, bf16 autocast
    assert training_arguments(full).bf16 and not training_arguments(lora).bf16
    assert precision(Recipe(method="msd", model=SPEC, output_dir="x", dtype="float32")) == ("float32", False)


def _mlc_reference(z: torch.Tensor, tau: float) -> float:
    """METHODS.md section 1, float64, one example at a time."""
    total = 0.0
    for zb in z.double():
        zb = zb / (zb.norm(dim=-1, keepdim=True) + 1e-12)
        s = torch.linalg.svdvals(zb)
        st = s / s[0]
        total += -(st[0] / tau - torch.logsumexp(st / tau, 0)).item()
    return total / z.shape[0]


def test_mlc_loss_upcasts_bf16_inputs():
    torch.manual_seed(0)
    z = torch.randn(3, 5, 64)
    got = mlc_loss(z.to(torch.bfloat16), tau=0.2)
    assert got.dtype == torch.float32
    assert math.isclose(float(got), _mlc_reference(z.to(torch.bfloat16).float(), 0.2), rel_tol=1e-4)
    assert math.isclose(float(got), _mlc_reference(z, 0.2), rel_tol=2e-2)     # bf16 rounding of the inputs


def _msd_losses(tmp_path, dtype: str, steps: int = 10) -> list[float]:
    torch.manual_seed(0)
    model = attach_lora(load_model(SPEC, dtype=dtype), LoraSettings(r=4, alpha=8))
    model.train()
    tok = load_tokenizer(SPEC)
    cfg = MSDConfig(mode="off_policy", student_languages=["th"], max_new_tokens=8, temperature=0.0)
    recs = load_prompts("builtin:harmful", None, "train", 2)
    r = Recipe(method="msd", model=SPEC, output_dir=str(tmp_path / dtype), seed=0,
               training={"max_steps": steps, "learning_rate": 1e-2, "per_device_train_batch_size": 2,
                         "save_strategy": "no"})
    trainer = MSDTrainer(model, training_arguments(r), cfg, build_msd_examples(recs, cfg), tok)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_bf16_loss_curve_follows_fp32(tmp_path):
    """Off-policy from the frozen teacher with greedy sampling: both runs distil the same responses,
    so the curves differ only by bf16 rounding of the frozen base. Tolerance: 10 % of the first loss
    per step (bf16 keeps 8 mantissa bits; the adapter and optimizer are fp32 in both runs)."""
    f32, bf16 = _msd_losses(tmp_path, "float32"), _msd_losses(tmp_path, "bfloat16")
    assert len(f32) == len(bf16) == 10
    assert f32[-1] < f32[0] and bf16[-1] < bf16[0]
    for a, b in zip(f32, bf16):
        assert abs(a - b) <= 0.1 * f32[0], (f32, bf16)


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_bf16_model_loads_in_bf16(dtype):
    from polyalign.models.loading import model_dtype

    assert model_dtype(load_model(SPEC, dtype=dtype)) == dtype
