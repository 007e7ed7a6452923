"""Every generation setting of generation (training-time sampling and evaluation), explicit.

``model.generate`` merges three layers: the arguments given, then the model's own
``generation_config`` (``generation_config.json`` of the checkpoint: Qwen ships
``repetition_penalty=1.05``, ``top_k=20``, ...), then library defaults (``top_k=50``). Overriding
temperature and top_p alone therefore samples y from a distribution nobody asked for: a repetition
penalty also penalises the query's own tokens. MSD's y must come from ``q`` as configured
(METHODS.md section 2) and evaluation must be the greedy decoding it claims, so every setting that changes the next-token distribution or the stopping
rule is passed here, with its neutral value unless the config asks otherwise.

They go in as keyword arguments, not as a ``GenerationConfig`` object: transformers (5.x) fills any
``None`` field of a passed config from the model's config, so "off" (``None``) could not be
expressed that way; keyword arguments are applied last and win, ``None`` included.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any


def sampling_kwargs(max_new_tokens: int, temperature: float, top_p: float = 1.0, pad_token_id: int | None = None,
                    eos_token_ids: list[int] | None = None, top_k: int | None = None,
                    repetition_penalty: float = 1.0) -> dict[str, Any]:
    """``generate`` keyword arguments for plain ancestral sampling (``temperature == 0``: greedy).

    Args:
        max_new_tokens: length cap of y.
        temperature: softmax temperature; 0 decodes greedily.
        top_p: nucleus mass (1.0 = off).
        pad_token_id, eos_token_ids: padding and the tokens that end y (None: the model's EOS).
        top_k: sampling only; None = the whole vocabulary.
        repetition_penalty: 1.0 (none) unless asked for.
    """
    greedy = temperature == 0
    return {
        # what y is drawn from
        "do_sample": not greedy, "num_beams": 1, "temperature": None if greedy else temperature,
        "top_p": None if greedy else top_p, "top_k": None if greedy else top_k, "min_p": None, "top_h": None, "typical_p": None,
        "epsilon_cutoff": None, "eta_cutoff": None,
        # no penalties, biases or forced / suppressed tokens
        "repetition_penalty": repetition_penalty, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
        "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "sequence_bias": None,
        "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
        "forced_eos_token_id": None, "exponential_decay_length_penalty": None, "guidance_scale": None,
        "watermarking_config": None, "renormalize_logits": False, "remove_invalid_values": False,
        # when y stops
        "max_new_tokens": max_new_tokens, "min_new_tokens": None, "min_length": 0, "max_length": None,
        "max_time": None, "stop_strings": None, "pad_token_id": pad_token_id,
        **({"eos_token_id": eos_token_ids} if eos_token_ids is not None else {}),
        # one sequence per prompt, with the KV cache
        "num_return_sequences": 1, "use_cache": True,
    }


@functools.cache
def _folded_linear_class() -> type:
    """``FoldedLinear``, defined once. (A class defined per call, its forward closing over the folded
    weight, made a reference cycle per layer and step that only the cyclic GC freed: the demo's 0.5B
    run grew ~1 GB a step and was killed at 24 GB on 2026-12-04.)"""
    import torch

    class FoldedLinear(torch.nn.Module):
        """``x W^T + b`` with tensors it holds as plain attributes (no parameters)."""

        def __init__(self, weight: Any, bias: Any):
            super().__init__()
            self.folded_weight, self.folded_bias = weight, bias

        def forward(self, x: Any) -> Any:
            return torch.nn.functional.linear(x, self.folded_weight, self.folded_bias)

    return FoldedLinear


def _linear(weight: Any, bias: Any) -> Any:
    """A module computing ``x W^T + b`` with tensors it holds as plain attributes (no parameters)."""
    return _folded_linear_class()(weight, bias)


def _folded(module: Any, adapter: bool) -> Any:
    """The stand-in for one LoRA ``Linear`` wrapper: its base layer (adapter off), or a linear layer
    whose weight is base + the active adapters' delta, a new tensor (the base is not written)."""
    base = module.base_layer
    if not adapter:
        return base
    weight = base.weight.detach()
    for name in module.active_adapters:
        if name in module.lora_A:
            weight = weight + module.get_delta_weight(name).detach().to(weight.dtype)
    return _linear(weight, None if base.bias is None else base.bias.detach())


@contextlib.contextmanager
def folded_lora(model: Any, adapter: bool = True) -> Iterator[None]:
    """While generating, every plain LoRA ``Linear`` wrapper of ``model`` is swapped for one linear
    layer -- base + delta (``adapter=True``: the student) or the base layer itself (``adapter=False``:
    the adapter-disabled teacher) -- and put back afterwards.

    Why: decoding runs the network one token at a time, and PEFT's wrapper adds, per wrapped layer
    (7 per transformer block) and token, the adapter's two small matmuls plus a dozen Python-level
    ops. Unlike ``merge_adapter`` nothing is written into the base weights, so they stay bit for bit
    what they were, and the adapter's parameters, gradients and optimizer state are untouched. The
    folded weight equals base + B A * scaling up to rounding (exactly the base while B is 0, as at
    initialisation). Generation runs in eval mode, where LoRA dropout is the identity. Wrappers with a
    variant (DoRA), ``fan_in_fan_out`` or an adapter already merged are left as they are, and so is a
    model that is not a PEFT model.
    """
    from polyalign.models.adapters import is_peft

    swapped = []
    if is_peft(model):
        from peft.tuners.lora.layer import Linear as LoraLinear

        for name, m in list(model.named_modules()):
            if (type(m) is not LoraLinear or m.merged or m.lora_variant or getattr(m, "fan_in_fan_out", False)
                    or type(m.base_layer).__name__ != "Linear"):
                continue
            parent_name, _, attr = name.rpartition(".")
            swapped.append((model.get_submodule(parent_name) if parent_name else model, attr, m))
    try:
        for parent, attr, m in swapped:
            setattr(parent, attr, _folded(m, adapter and not m.disable_adapters))
        yield
    finally:
        for parent, attr, m in reversed(swapped):
            setattr(parent, attr, m)
