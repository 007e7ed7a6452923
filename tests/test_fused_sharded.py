"""The fused LM head with a sharded head (ZeRO-3, FSDP), and HF sampling's settings under sharding.

No DeepSpeed and no GPU here: a ZeRO-3-like head is emulated (``ds_id``, empty outside the forward,
materialised by forward hooks as ZeRO-3's are, and by a stand-in ``deepspeed.zero.GatheredParameters``).
What these tests show is polyalign's side: the head is gathered read-only, the fused loss and
gradients equal the unfused ones (a frozen head gathered once, a trained one inside the forward),
and where fusing is impossible one warning says why.
"""

import contextlib
import importlib.machinery
import logging
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from polyalign.models.sampling import sampling_kwargs
from polyalign.train import msd_trainer as trainer_mod
from tests.test_fused_msd import loss_and_grads, make_trainer


class Zero3Like:
    """Partitions ``param`` as ZeRO-3 does outside the forward (``ds_id``, numel 0); the modules that
    use it (the head, and the embeddings it is tied to) materialise it in their forward, and
    ``deepspeed.zero.GatheredParameters`` (installed by the test) does so for direct reads."""

    def __init__(self, param: torch.nn.Parameter, modules: list[torch.nn.Module]):
        self.param, self.full = param, param.data.clone()
        param.ds_id = 7
        self.gathers: list[dict] = []
        for m in modules:
            m.register_forward_pre_hook(lambda *_: self.materialise())
            m.register_forward_hook(lambda *_: self.partition())
        self.partition()

    def materialise(self):
        self.param.data = self.full

    def partition(self):
        self.param.data = torch.empty(0, dtype=self.full.dtype)

    @contextlib.contextmanager
    def gathered_parameters(self, params, modifier_rank=0):
        self.gathers.append({"params": list(params), "modifier_rank": modifier_rank})
        self.materialise()
        try:
            yield
        finally:
            self.partition()


def fake_zero3(monkeypatch, model) -> Zero3Like:
    head = model.get_output_embeddings()
    modules = [head] + ([model.get_input_embeddings()] if model.get_input_embeddings().weight is head.weight else [])
    sharded = Zero3Like(head.weight, modules)
    deepspeed = types.ModuleType("deepspeed")
    deepspeed.__spec__ = importlib.machinery.ModuleSpec("deepspeed", None)   # no metadata: "not installed" to accelerate
    deepspeed.zero = SimpleNamespace(GatheredParameters=sharded.gathered_parameters)
    monkeypatch.setitem(sys.modules, "deepspeed", deepspeed)
    return sharded


def test_zero3_frozen_head_is_gathered_read_only_and_fused_equals_unfused(tmp_path, monkeypatch):
    trainer, model = make_trainer(tmp_path)                       # LoRA: the head is frozen
    head = model.get_output_embeddings()
    sharded = fake_zero3(monkeypatch, model)
    assert head.weight.numel() == 0                               # what _linear_head sees outside the forward
    with monkeypatch.context() as m:                              # fused: full logits must never be computed
        fused, g_fused = loss_and_grads(trainer, model, True, m)
    assert sharded.gathers and all(g["modifier_rank"] is None for g in sharded.gathers)
    assert [p is head.weight for p in sharded.gathers[0]["params"]] == [True]
    with monkeypatch.context() as m:
        full, g_full = loss_and_grads(trainer, model, False, m)
    assert head.weight.numel() == 0 and full > 0
    torch.testing.assert_close(fused, full, rtol=1e-5, atol=1e-7)
    assert set(g_fused) == set(g_full) and g_full
    for n in g_full:                    # fp32: elementwise to 1e-4 of the tensor's largest entry
        torch.testing.assert_close(g_fused[n], g_full[n], rtol=1e-4, atol=1e-4 * float(g_full[n].abs().max()))
    # student and teacher share the one gathered copy, gathered once for the run (the head is frozen)
    trainer.compute_loss(model, {"examples": trainer.train_dataset[:4]})
    assert len(sharded.gathers) == 1
    assert trainer._linear_head(model) is trainer._linear_head(model)


def test_zero3_trained_head_is_fused_inside_the_forward_and_equals_unfused(tmp_path, monkeypatch):
    """Full fine-tuning: the (tied) head trains and is sharded. The student's forward, head and
    divergence run inside the wrapper's forward (TRL's _ForwardRedirection), the head is gathered
    there, and the fused loss and every gradient (the head's included) equal the unfused ones."""
    trainer, model = make_trainer(tmp_path, lora=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))                        # the student moves off the teacher
    head = model.get_output_embeddings()
    sharded = fake_zero3(monkeypatch, model)
    # ZeRO-3 takes the full-size gradient of a partitioned parameter in its own hooks; here the
    # parameter is made whole again for it, just before autograd accumulates
    head.weight.register_hook(lambda g: sharded.materialise() or g)
    assert isinstance(trainer._linear_head(model), trainer_mod.TrainedShardedHead)
    redirected = []

    class Spy(trainer_mod._ForwardRedirection):
        def __call__(self, wrapper, original, method, *args, **kwargs):
            redirected.append(method.__name__)
            return super().__call__(wrapper, original, method, *args, **kwargs)

    monkeypatch.setattr(trainer_mod, "_ForwardRedirection", Spy)
    with monkeypatch.context() as m:                              # fused: full logits must never be computed
        fused, g_fused = loss_and_grads(trainer, model, True, m)
    sharded.partition()
    assert redirected == ["_student_fused"]
    assert sharded.gathers and all(g["modifier_rank"] is None for g in sharded.gathers)   # read-only gather
    with monkeypatch.context() as m:
        full, g_full = loss_and_grads(trainer, model, False, m)
    assert full > 0 and "model.embed_tokens.weight" in g_full                 # the tied head's gradient
    torch.testing.assert_close(fused, full, rtol=1e-5, atol=1e-7)
    assert set(g_fused) == set(g_full)
    for n in g_full:                    # fp32: elementwise to 1e-4 of the tensor's largest entry
        torch.testing.assert_close(g_fused[n], g_full[n], rtol=1e-4, atol=1e-4 * float(g_full[n].abs().max()))


def test_unfusable_head_warns_once_per_reason(tmp_path, caplog):
    trainer, model = make_trainer(tmp_path)
    model.config.final_logit_softcapping = 30.0
    with caplog.at_level(logging.WARNING, logger=trainer_mod.__name__):
        for _ in range(3):
            assert trainer._linear_head(model) is None
    assert [r.getMessage() for r in caplog.records].count(
        "msd.fused_lm_head: the model soft-caps or scales its logits, so full [B, R, V] logits are used") == 1


# ---------------------------------------------------------------- HF sampling under sharding
def _state(zero3: bool = False, fsdp: int | None = None, processes: int = 2):
    """What TRL's DistributedBackend and Accelerator read from ``accelerator.state``."""
    return SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3) if zero3 else None,
                           fsdp_plugin=SimpleNamespace(fsdp_version=fsdp) if fsdp else None,
                           num_processes=processes, device=torch.device("cpu"))


@pytest.mark.parametrize(("state", "synced"), [
    (dict(zero3=True), True), (dict(fsdp=1), True), (dict(fsdp=2), True),
    (dict(), False), (dict(zero3=True, processes=1), False),
])
def test_hf_sampling_passes_synced_gpus_when_sharded(tmp_path, monkeypatch, state, synced):
    trainer, model = make_trainer(tmp_path)
    del trainer.sample_responses                                  # make_trainer stubs it out
    monkeypatch.setattr(trainer.accelerator, "state", _state(**state))
    # generation itself is not what is tested: TRL's unwrap would import DeepSpeed under ZeRO-3
    monkeypatch.setattr(trainer_mod, "unwrap_model_for_generation",
                        contextlib.contextmanager(lambda m, acc: (yield acc.unwrap_model(m))))
    seen = []

    def generate(input_ids, attention_mask, **kwargs):
        seen.append(kwargs)
        return torch.cat([input_ids, torch.full((input_ids.shape[0], 2), 5)], 1)

    monkeypatch.setattr(model, "generate", generate)
    out = trainer.sample_responses(model, [[1, 2, 3], [4, 5]], from_teacher=False)
    assert out == [[5, 5], [5, 5]]
    assert seen[0].get("synced_gpus") is (True if synced else None)
    # the sampling settings are untouched: those sampling_kwargs gives for the config's draw
    # (inverse_cdf: greedy over scores its processors have sampled; their types stand for them)
    expected = sampling_kwargs(trainer.msd.max_new_tokens, trainer.msd.temperature, trainer.msd.top_p,
                               draw=trainer.msd.draw)
    for key in ("do_sample", "temperature", "top_p", "top_k", "max_new_tokens"):
        assert seen[0][key] == expected[key], key
    assert ([type(x) for x in seen[0].get("logits_processor", [])]
            == [type(x) for x in expected.get("logits_processor", [])])


FSDP2_LIKE = r'''
import json, os, pathlib, socket, sys, tempfile
import pytest, torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
sys.path.insert(0, os.getcwd())
from tests.test_fused_msd import loss_and_grads, make_trainer
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
trainer, model = make_trainer(pathlib.Path(tempfile.mkdtemp()))
head = model.get_output_embeddings()
full = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
sharded = torch.nn.Parameter(distribute_tensor(full.detach().clone(), mesh, [Shard(0)]), requires_grad=False)
# FSDP2: the module holds a DTensor outside its forward and the unsharded weight inside it
head.register_forward_pre_hook(lambda m, i: m._parameters.__setitem__("weight", full))
head.register_forward_hook(lambda m, i, o: m._parameters.__setitem__("weight", sharded))
head._parameters["weight"] = sharded
out = {"dtensor_outside": isinstance(head.weight, DTensor)}
with pytest.MonkeyPatch.context() as m:
    fused, g_fused = loss_and_grads(trainer, model, True, m)
with pytest.MonkeyPatch.context() as m:
    unfused, g_full = loss_and_grads(trainer, model, False, m)
out.update(fused=float(fused), unfused=float(unfused), copy_is_plain=not isinstance(trainer._linear_head(model).weight, DTensor),
           grads=sorted(g_full) == sorted(g_fused),
           grad_err=max(float((g_fused[n] - g_full[n]).abs().max() / g_full[n].abs().max()) for n in g_full))
dist.destroy_process_group()
print("RESULT " + json.dumps(out))
'''


def test_fsdp2_dtensor_head_is_gathered_and_fused_equals_unfused():
    """A DTensor head (FSDP2's sharded parameter), on a one-process gloo mesh in a subprocess (a process
    group in the test process would change what accelerate sees in later tests)."""
    import json
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", FSDP2_LIKE], cwd=root, capture_output=True, text=True, timeout=300)
    lines = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["dtensor_outside"] and out["copy_is_plain"] and out["grads"]
    assert out["unfused"] > 0 and abs(out["fused"] - out["unfused"]) <= 1e-5 * out["unfused"] + 1e-7
    assert out["grad_err"] <= 1e-4


DTENSOR_TRAINED_HEAD = r'''
import json, socket
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from polyalign.losses.msd import fused_token_divergence
from polyalign.train.msd_trainer import TrainedShardedHead
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
torch.manual_seed(0)
plain = torch.nn.Linear(16, 40, bias=True)
teacher = torch.nn.Linear(16, 40, bias=True).requires_grad_(False)
h_s, h_t = torch.randn(6, 16, requires_grad=True), torch.randn(6, 16)
sharded = torch.nn.Linear(16, 40, bias=True)
sharded.weight = torch.nn.Parameter(distribute_tensor(plain.weight.detach().clone(), mesh, [Shard(0)]))
sharded.bias = torch.nn.Parameter(distribute_tensor(plain.bias.detach().clone(), mesh, [Shard(0)]))
def loss(w, b, h):
    d, _ = fused_token_divergence(h, h_t, w, b, "reverse_kl", teacher_weight=teacher.weight, teacher_bias=teacher.bias)
    return (d * torch.arange(1, 7)).sum()
ref = loss(plain.weight, plain.bias, h_s)
ref.backward()
g_ref = (plain.weight.grad.clone(), plain.bias.grad.clone(), h_s.grad.clone())
h_s.grad = None
with TrainedShardedHead(sharded, "dtensor").full() as (w, b):
    out = loss(w, b, h_s)
out.backward()
gw, gb = sharded.weight.grad, sharded.bias.grad
res = {"dtensor_grads": isinstance(gw, DTensor) and isinstance(gb, DTensor), "loss_err": abs(float(out - ref)),
       "grad_err": max(float((a - b_).abs().max()) for a, b_ in
                       zip(g_ref, (gw.full_tensor(), gb.full_tensor(), h_s.grad)))}
dist.destroy_process_group()
print("RESULT " + json.dumps(res))
'''


def test_dtensor_trained_head_gradient_reaches_the_sharded_parameter():
    """FSDP2 with the head in its own unit: outside its forward the trained head is a DTensor, and the
    fused divergence's gradient must come back to it (all-gather forward, reduce-scatter backward)
    equal to the gradient of a plain head. One-process gloo mesh, in a subprocess."""
    import json
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", DTENSOR_TRAINED_HEAD], cwd=root, capture_output=True, text=True,
                         timeout=300)
    lines = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["dtensor_grads"] and out["loss_err"] <= 1e-5 and out["grad_err"] <= 1e-5
