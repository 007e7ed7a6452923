"""PEFT's LoRA ``Linear`` forward with the adapter's term added in one pass, bit for bit.

PEFT computes a wrapped layer as ``(base(x) + B(A(x.to(fp32))) * s).to(base dtype)``. With the fp32
adapter PEFT keeps for training, that makes three fp32 [tokens, out] tensors per layer in the forward
(B's product, ``* s``, the promoted sum) and two in the backward (the cast's gradient, ``* s``); at
512-token responses (batch 4, the 0.5B model's 4864-wide MLP) they are a large share of the
step's memory and traffic (BENCHMARKS.md, 2026-12-06). :class:`LoraAdd` computes the same numbers
with one each way:

- forward: ``torch.add(base(x), B h, alpha=s, out=<base dtype>)`` does the promoted sum and the cast
  in one pass. With ``s`` a power of two, ``s * o`` is exact, so the single rounding of
  ``base + s * o`` equals PEFT's ``o * s`` then ``+`` (short of overflow / subnormals, which LoRA
  terms do not reach); other scalings fall back to PEFT's forward.
- backward: PEFT's gradient of the sum is ``g`` cast to fp32 and back (exact), so ``base(x)`` gets
  ``g`` itself; ``B`` and ``h`` get ``s (g^T h)`` and ``s (g B)``, which equal PEFT's
  ``(g s)^T h`` and ``(g s) B`` for the same reason, from the same matrix products.

Outputs, the adapter's gradients and the input's gradient equal PEFT's bit for bit, in fp32 and bf16
(``tests/test_lora_add.py``). Every other case (adapter disabled or merged, several active adapters,
dropout, DoRA and other variants, a LoRA bias, autocast, a per-call ``adapter_names``) calls PEFT's
own forward.
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch
import torch.nn.functional as F

# Off: every wrapped layer runs PEFT's forward even where :func:`install` put this one (the switch
# ``benchmarks/msd_profile.py --one-pass-lora K`` compares the two with). Read at every call: flip it
# between steps, never between a forward and its backward (a checkpointed layer recomputes its
# forward in the backward and must save what the first forward saved).
ENABLED = True


class LoraAdd(torch.autograd.Function):
    """``(result + B(A(x.to(A's dtype))) * s).to(result.dtype)`` for a power-of-two ``s``: PEFT's
    vanilla LoRA sum, with one fp32 [..., out] tensor in the forward and one in the backward."""

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                scaling: float) -> torch.Tensor:
        xf = x.to(a.dtype)                                     # [..., in]   PEFT's _cast_input_dtype
        h = F.linear(xf, a)                                    # [..., r]
        o = F.linear(h, b)                                     # [..., out]  the one fp32 [..., out] tensor
        out = torch.empty_like(result)
        torch.add(result, o, alpha=scaling, out=out)           # promoted sum, cast on store: one pass
        ctx.save_for_backward(xf, h, a, b)
        ctx.scaling, ctx.x_dtype = scaling, x.dtype
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        xf, h, a, b = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_a, need_b = ctx.needs_input_grad[1:4]
        gf = g.to(b.dtype)                                     # [..., out]  the one fp32 [..., out] tensor
        gh = (gf @ b) * s if (need_x or need_a) else None      # [..., r]    = (g s) B
        gb = (gf.reshape(-1, gf.shape[-1]).t() @ h.reshape(-1, h.shape[-1])) * s if need_b else None  # [out, r]
        ga = gh.reshape(-1, gh.shape[-1]).t() @ xf.reshape(-1, xf.shape[-1]) if need_a else None      # [r, in]
        gx = (gh @ a).to(ctx.x_dtype) if need_x else None      # [..., in]
        return g, gx, ga, gb, None


def power_of_two(s: Any) -> bool:
    """Whether scaling by ``s`` is exact in floating point (``2^k``, k any integer): a LoRA scaling
    ``alpha / r`` of 2, 1, 0.5, ..."""
    return isinstance(s, (int, float)) and s > 0 and math.frexp(s)[0] == 0.5


def one_pass_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A LoRA ``Linear``'s forward: :class:`LoraAdd` where it computes PEFT's numbers, PEFT's own
    forward everywhere else."""
    peft_forward = type(self).forward
    if not ENABLED or args or kwargs or self.disable_adapters or self.merged:
        return peft_forward(self, x, *args, **kwargs)
    names = [n for n in self.active_adapters if n in self.lora_A]
    if len(names) != 1:
        return peft_forward(self, x, *args, **kwargs)
    name = names[0]
    a, b, s = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
    if (name in self.lora_variant or not isinstance(self.lora_dropout[name], torch.nn.Identity)
            or self.lora_B[name].bias is not None or not power_of_two(s) or a.dtype != b.dtype
            or not getattr(self, "cast_input_dtype_enabled", True) or not x.is_floating_point()
            or torch.is_autocast_enabled(x.device.type)):
        return peft_forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    if not result.is_floating_point() or result.shape[:-1] != x.shape[:-1]:
        return peft_forward(self, x)
    return LoraAdd.apply(result, x, a, b, float(s))


def install(model: Any) -> int:
    """Give every PEFT LoRA ``Linear`` of ``model`` :func:`one_pass_forward` (an instance attribute;
    the module, its parameters and hooks stay as they are). Skipped: modules whose ``forward`` is
    already an instance attribute (accelerate's offload hooks). Returns how many were given it.

    Not for sharded training: the forward reads ``lora_A`` / ``lora_B``'s weights without calling
    those modules, so ZeRO-3 / FSDP hooks that gather a module's parameters when it is called would
    not run (``MSDTrainer`` installs it on one process or under DDP only)."""
    from peft.tuners.lora.layer import Linear

    n = 0
    for m in model.modules():
        if type(m) is Linear and "forward" not in vars(m):
            m.forward = types.MethodType(one_pass_forward, m)
            n += 1
    return n


def uninstall(model: Any) -> None:
    """PEFT's own forward back on every module :func:`install` changed."""
    for m in model.modules():
        f = vars(m).get("forward")
        if isinstance(f, types.MethodType) and f.__func__ is one_pass_forward:
            del m.forward
