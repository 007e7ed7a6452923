"""``polyalign.models.lora_add``: PEFT's LoRA forward with one pass for the adapter's sum, bit for bit.

References: PEFT's own ``lora.Linear.forward`` (outputs and every gradient equal, fp32 and bf16),
an explicit float64 loop over tokens for the math, and ``gradcheck``.
"""

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear

from polyalign.models import lora_add

ROOT = Path(__file__).resolve().parents[1]


class MLP(torch.nn.Module):
    def __init__(self, d: int = 24, f: int = 40):
        super().__init__()
        self.up = torch.nn.Linear(d, f, bias=False)
        self.down = torch.nn.Linear(f, d, bias=True)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.up(x)))


def wrapped(dtype, alpha=8, r=4, dropout=0.0, seed=0):
    """A bf16 / fp32 base with an fp32 adapter (as PEFT keeps it for training), B non-zero."""
    torch.manual_seed(seed)
    m = get_peft_model(MLP().to(dtype), LoraConfig(r=r, lora_alpha=alpha, target_modules=["up", "down"],
                                                   lora_dropout=dropout))
    for n, p in m.named_parameters():
        if "lora_" in n:
            p.data = torch.randn_like(p, dtype=torch.float64 if dtype == torch.float64 else torch.float32) * 0.1
    return m


def run(m, x):
    """Output, adapter gradients and input gradient of one forward + backward."""
    m.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = m(x)
    (y.float() ** 2).sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}, x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 24), (2, 7, 24), (1, 1, 24)])
def test_one_pass_equals_peft_bit_for_bit(dtype, shape):
    m = wrapped(dtype)
    x = torch.randn(*shape, dtype=dtype)
    ref = run(m, x)
    assert lora_add.install(m) == 2
    calls = []
    real = lora_add.LoraAdd.apply
    lora_add.LoraAdd.apply = lambda *a: calls.append(1) or real(*a)
    try:
        new = run(m, x)
    finally:
        lora_add.LoraAdd.apply = real
        lora_add.uninstall(m)
    assert len(calls) == 2                                   # both layers took the one-pass sum
    assert new[0].dtype == ref[0].dtype and torch.equal(new[0], ref[0])
    assert ref[1].keys() == new[1].keys() and len(ref[1]) == 4
    for n in ref[1]:
        assert torch.equal(new[1][n], ref[1][n]), n
    assert torch.equal(new[2], ref[2])


def test_one_pass_matches_an_explicit_float64_loop():
    """The math: out[t] = base(x[t]) + s * B (A x[t]), one token at a time in float64."""
    m = wrapped(torch.float64, alpha=16, r=4)
    layer = m.base_model.model.up
    lora_add.install(m)
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    with torch.no_grad():
        got = layer(x)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    w = layer.base_layer.weight
    want = torch.empty_like(got)
    for i in range(3):
        for t in range(5):
            v = x[i, t]
            want[i, t] = w @ v + 4.0 * (b @ (a @ v))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gradcheck_float64():
    base = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: lora_add.LoraAdd.apply(*t, 0.5), (base, x, a, b))


@pytest.mark.parametrize("case", ["scaling", "dropout", "disabled", "switch_off", "several_adapters"])
def test_peft_forward_wherever_one_pass_would_not_be_peft(case):
    """A non-power-of-two scaling (alpha 6 / r 4), dropout, a disabled adapter, the switch off, two
    active adapters: PEFT's forward runs (no LoraAdd call) and the numbers are PEFT's."""
    m = wrapped(torch.bfloat16, alpha=6 if case == "scaling" else 8, dropout=0.1 if case == "dropout" else 0.0)
    m.eval()                                                 # dropout's mask would differ between the runs
    x = torch.randn(2, 3, 24, dtype=torch.bfloat16)
    if case == "several_adapters":
        m.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"]))
        m.base_model.set_adapter(["default", "other"])
    ctx = m.disable_adapter() if case == "disabled" else torch.enable_grad()
    with ctx:
        ref = run(m, x)
        lora_add.install(m)
        calls = []
        real = lora_add.LoraAdd.apply
        lora_add.LoraAdd.apply = lambda *a: calls.append(1) or real(*a)
        lora_add.ENABLED = case != "switch_off"
        try:
            new = run(m, x)
        finally:
            lora_add.LoraAdd.apply, lora_add.ENABLED = real, True
            lora_add.uninstall(m)
    assert calls == []
    assert torch.equal(new[0], ref[0])
    for n in ref[1]:
        assert torch.equal(new[1][n], ref[1][n]), n


def test_install_and_uninstall_leave_peft_forward_and_foreign_forwards_alone():
    m = wrapped(torch.float32)
    layers = [mod for mod in m.modules() if type(mod) is LoraLinear]
    foreign = types.MethodType(lambda self, x: x, layers[1])
    layers[1].forward = foreign                              # e.g. accelerate's offload hook
    assert lora_add.install(m) == 1
    assert vars(layers[0])["forward"].__func__ is lora_add.one_pass_forward
    lora_add.uninstall(m)
    assert "forward" not in vars(layers[0]) and vars(layers[1])["forward"] is foreign


@pytest.mark.parametrize("checkpointing", [False, True])
def test_msd_trainer_trains_the_same_adapter_either_way(tmp_path, checkpointing):
    """Two MSD steps on the tiny model with the one-pass sum and with PEFT's forward: the same losses
    and adapter bit for bit (gradient checkpointing recomputes the layers in the backward)."""
    from test_msd_speed import adapter, demo_like_trainer

    runs = {}
    for on in (False, True):
        trainer, model = demo_like_trainer(tmp_path / str(on), legacy=False)
        if checkpointing:
            trainer.args.gradient_checkpointing = True
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        calls = []
        real = lora_add.LoraAdd.apply
        lora_add.LoraAdd.apply = lambda *a, c=calls, f=real: c.append(1) or f(*a)
        lora_add.ENABLED = on
        try:
            trainer.train()
        finally:
            lora_add.LoraAdd.apply, lora_add.ENABLED = real, True
        assert bool(calls) == on
        assert not any("forward" in vars(mod) for mod in model.modules())      # uninstalled after each step
        runs[on] = ([h["loss"] for h in trainer.state.log_history if "loss" in h], adapter(model))
    assert runs[True][0] == runs[False][0] and len(runs[True][0]) == 2
    for n, w in runs[False][1].items():
        assert torch.equal(runs[True][1][n], w), n


def test_profile_script_compares_one_pass_lora_on_the_tiny_model():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "msd_profile.py"), "--model", "builtin:tiny-random",
                          "--max-new-tokens", "4", "--batch", "2", "--one-pass-lora", "1", "--no-warmup"],
                         capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ratio msd_step_one_pass_lora_vs_peft" in out.stdout
    assert "the same responses, loss and gradients bit for bit: True" in out.stdout, out.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pass_on_cuda_equals_peft(dtype):
    """On a GPU (scripts/gpu_check.sh runs it): the same outputs bit for bit (the same products and a
    power-of-two scaling); gradients from cuBLAS products laid out differently, so within rounding."""
    m = wrapped(dtype).cuda()
    x = torch.randn(2, 7, 24, dtype=dtype, device="cuda")
    ref = run(m, x)
    lora_add.install(m)
    try:
        new = run(m, x)
    finally:
        lora_add.uninstall(m)
    assert torch.equal(new[0], ref[0])
    for n in ref[1]:
        torch.testing.assert_close(new[1][n], ref[1][n], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new[2].float(), ref[2].float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-5)
