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

DRAWS = ("multinomial", "inverse_cdf")


def sampling_kwargs(max_new_tokens: int, temperature: float, top_p: float = 1.0, pad_token_id: int | None = None,
                    eos_token_ids: list[int] | None = None, top_k: int | None = None,
                    repetition_penalty: float = 1.0, draw: str = "multinomial") -> dict[str, Any]:
    """``generate`` keyword arguments for plain ancestral sampling (``temperature == 0``: greedy).

    Args:
        max_new_tokens: length cap of y.
        temperature: softmax temperature; 0 decodes greedily.
        top_p: nucleus mass (1.0 = off).
        pad_token_id, eos_token_ids: padding and the tokens that end y (None: the model's EOS).
        top_k: sampling only; None = the whole vocabulary.
        repetition_penalty: 1.0 (none) unless asked for.
        draw: how a sampled token is drawn from the (tempered, truncated) distribution: ``multinomial``
            (``generate``'s own ``torch.multinomial``) or ``inverse_cdf`` (:class:`InverseCDFDraw`: the
            same distribution, another use of the random stream; 12x cheaper at 151,936 tokens on a CPU).
    """
    if draw not in DRAWS:
        raise ValueError(f"draw must be one of {DRAWS}, got {draw!r}")
    greedy = temperature == 0
    if draw == "inverse_cdf" and not greedy:
        # generate decodes "greedily" over scores that the processors below have already sampled:
        # HF's own warpers (in its own order), then the draw, which leaves one finite score per row.
        from transformers import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        chain = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
        chain += [TopKLogitsWarper(top_k)] if top_k else []
        chain += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
        greedy_kwargs = sampling_kwargs(max_new_tokens, 0.0, 1.0, pad_token_id, eos_token_ids, None, repetition_penalty)
        return {**greedy_kwargs, "logits_processor": LogitsProcessorList([*chain, InverseCDFDraw()])}
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


class InverseCDFDraw:
    """A ``generate`` logits processor that samples: y_t ~ softmax(scores), drawn by inverse CDF.

    ``torch.multinomial`` (what ``generate`` samples with) draws an exponential variate for every
    vocabulary entry: 28 ms for 8 rows x 151,936 on an AVX2 CPU, softmax included; a sixth of a 0.5B decode step.
    One uniform per row against the cumulative sum of the probabilities (float64, so that 151,936
    small terms add up exactly enough) draws from the same distribution in 2.4 ms
    (``benchmarks/decode_linears.py --decode-profile``). Token ``i`` is drawn when ``u`` lands in
    ``[cdf[i-1], cdf[i])``, an interval of width ``p_i``: zero-probability tokens (``-inf`` scores, a
    top-p cut) are never drawn. Returns 0 at the drawn token and ``-inf`` elsewhere, so greedy
    decoding's argmax takes it.
    """

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        cdf = torch.softmax(scores.float(), dim=-1).double().cumsum(dim=-1)                    # [B, V]
        u = torch.rand(cdf.shape[0], 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]     # [B, 1] in [0, total)
        # The first i with cdf[i] > u. u < cdf[V-1] but for rounding (u * total can round up to
        # total), where the search answers V: the clamp makes that the last token, as a search of
        # the first V - 1 bounds would (same indices, without copying that slice every token).
        drawn = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)        # [B, 1]
        return torch.full_like(scores, float("-inf")).scatter_(1, drawn, 0.0)


# oneDNN's inner product beats MKL's sgemm on the few-row products of decoding (one row per sequence
# and token), measured on an AVX2 AMD EPYC in fp32 (`benchmarks/decode_linears.py --products-only`,
# BENCHMARKS.md): 1.2-1.7x on the 0.5B model's wider layers at 8 rows, 2.3x on its 151,936-wide LM
# head (1.7x at 32 rows); at 512 rows (a prefill) MKL is faster (0.90-0.95x), and on layers under
# 256 outputs (k / v projections) oneDNN is not faster at 8 or 32 rows.
ONEDNN_MAX_ROWS = 128
ONEDNN_MIN_OUT_FEATURES = 256

# oneDNN reads a plain row-major weight through a reorder on every call; a weight reordered once into
# oneDNN's own blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, what inductor's CPU
# weight-packing pass does) is read directly: 1.4-1.6x faster at 8 rows on the 0.5B model's layers
# and its LM head, with bit-identical outputs from 3 rows up (benchmarks/decode_linears.py --packing,
# BENCHMARKS.md). Each layer is packed at its first few-row product within one generation context;
# an owner that generates many times with frozen layers (the MSD trainer: the LM head every step)
# keeps their packed copies in a :class:`PackedWeights`.
#
# On a CPU with native bf16 (AMX / avx512_bf16) the same path serves a bf16 model: packed bf16
# products at 8 rows are 1.5-2.4x plain ``F.linear`` on the 0.5B model's layers and its LM head,
# unpacked ones no faster; greedy generation gives the same tokens (an Intel Xeon with AMX,
# 2026-12-05; `benchmarks/decode_linears.py --dtype bfloat16 --eval-batches 3`, BENCHMARKS.md).
# A folded weight (new every MSD step) is packed too: with glibc keeping freed blocks
# (``keep_freed_cpu_memory``) its packed copy no longer page-faults in afresh each step, and the
# demo's 48-token sampling went 4.86 -> 4.15 s with the same tokens (2026-12-06, ``--pack-folded``);
# before that change packing cost about what it saved. Where bf16 is emulated, the path stays off.
#
# ``PACK_FOLDED``: whether folded bf16 weights are packed (False: as before 2026-12-06, fp32 ones
# still are); the switch ``benchmarks/decode_linears.py --pack-folded`` measures it with.
PACK_FOLDED = True


def onednn_dtypes() -> tuple[Any, ...]:
    """The weight dtypes oneDNN's few-row path serves here: fp32, and bf16 where the CPU has it natively."""
    import torch

    from polyalign.models.loading import cpu_has_fast_bf16

    return (torch.float32, torch.bfloat16) if cpu_has_fast_bf16() else (torch.float32,)


def onednn_packing_enabled() -> bool:
    """Pack weights for oneDNN's few-row products unless ``POLYALIGN_ONEDNN_PACK=0`` (the switch the
    benchmark measures it with)."""
    import os

    import torch

    return os.environ.get("POLYALIGN_ONEDNN_PACK", "1") != "0" and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedWeights:
    """Packed copies of frozen parameters, kept across generation contexts by their owner.

    A copy is reused while its parameter is the same object, frozen (``requires_grad`` False), with
    the same storage and version counter. A write through ``.data`` (PEFT's ``merge`` does
    ``weight.data += delta``) changes none of these, so an owner must not keep one across such a
    write: the MSD trainer holds one for its frozen LM head, which nothing writes while it trains.
    Evaluation does not keep one (it merges adapters into the base weights that way)."""

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[Any, int, int, Any]] = {}

    def get(self, param: Any, weight: Any, rows: int) -> Any:
        import weakref

        import torch

        if param.requires_grad:
            return torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        sig = (param._version, param.data_ptr())
        hit = self._by_id.get(id(param))
        if hit is not None and hit[0]() is param and hit[1:3] == sig:
            return hit[3]
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        self._by_id[id(param)] = (weakref.ref(param), *sig, packed)
        return packed


def onednn_decoding_enabled() -> bool:
    """oneDNN for few-row fp32 products on the CPU: where torch has it, unless
    ``POLYALIGN_ONEDNN_DECODE=0`` (the switch that measures it, and a way out should a build lack it)."""
    import os

    import torch

    return (os.environ.get("POLYALIGN_ONEDNN_DECODE", "1") != "0" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@functools.cache
def _folded_linear_class() -> type:
    """``FoldedLinear``, defined once. (A class defined per call, its forward closing over the folded
    weight, made a reference cycle per layer and step that only the cyclic GC freed: the demo's 0.5B
    run grew ~1 GB a step and was killed at 24 GB on 2026-12-04.)"""
    import torch

    from polyalign.models.loading import canonical_strides

    class FoldedLinear(torch.nn.Module):
        """``x W^T + b`` with tensors it holds as plain attributes (no parameters), for generation.

        Few-row fp32 (and natively fast bf16) products on the CPU go to oneDNN (``onednn``, :data:`ONEDNN_MAX_ROWS`); everything
        else, and anything that needs a gradient (oneDNN's op has no backward), to ``F.linear``.
        """

        def __init__(self, weight: Any, bias: Any, onednn: bool = False, frozen: Any = None,
                     keep: PackedWeights | None = None):
            super().__init__()
            self.folded_weight, self.folded_bias = weight, bias
            self.onednn = (onednn and weight.device.type == "cpu" and weight.dtype in onednn_dtypes()
                           and weight.shape[0] >= ONEDNN_MIN_OUT_FEATURES)
            self.pack = self.onednn and onednn_packing_enabled() and (PACK_FOLDED or frozen is not None
                                                                       or weight.dtype == torch.float32)
            self.frozen, self.keep = frozen, keep   # the parameter a frozen weight views; its owner's cache
            self.packed_weight: Any = None    # packed at the first few-row product, for its row count

        def forward(self, x: Any) -> Any:
            w, b = self.folded_weight, self.folded_bias
            if (self.onednn and x.dtype == w.dtype and x.numel() <= ONEDNN_MAX_ROWS * x.shape[-1]
                    and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
                if self.pack and self.packed_weight is None:
                    rows = x.numel() // x.shape[-1]
                    self.packed_weight = (self.keep.get(self.frozen, w, rows) if self.keep is not None and
                                          self.frozen is not None else torch.ops.mkldnn._reorder_linear_weight(w, rows))
                wp = w if self.packed_weight is None else self.packed_weight
                return torch.ops.mkldnn._linear_pointwise(x.contiguous(), wp, b, "none", [], "")
            # a stand-in for the LM head loses its contiguous-input hook (``contiguous_head_input``):
            # past ONEDNN_MAX_ROWS a prefill's strided [B, 1, H] slice would take torch's batched
            # path, which copies the [V, H] weight once per row (144 rows of the 0.5B model: a 39 GB
            # allocation that fails, then minutes in baddbmm)
            if x.stride() != canonical_strides(x.shape):
                x = x.clone(memory_format=torch.contiguous_format)
            return torch.nn.functional.linear(x, w, b)

    return FoldedLinear


def lora_beside_enabled() -> bool:
    """``POLYALIGN_LORA_BESIDE=1``: while decoding on oneDNN, the student's wrapped layers keep the
    frozen base packed across MSD steps and compute LoRA beside it, as PEFT's forward does, instead
    of folding base + delta into a new weight every step (:func:`_folded`). Off by default: in bf16 a
    folded weight rounds base + delta once, PEFT's forward adds the two products, so samples (and a
    run's adapter) differ at one seed; ``benchmarks/decode_linears.py --lora-beside`` measures it."""
    import os

    return os.environ.get("POLYALIGN_LORA_BESIDE", "0") == "1"


@functools.cache
def _lora_beside_class() -> type:
    import torch

    class LoraBesideLinear(torch.nn.Module):
        """PEFT's LoRA ``Linear.forward`` over plain tensors: ``base(x)``, plus each adapter's
        ``B(A(x)) * scaling`` with ``x`` in the adapter's dtype, cast back to the base's output dtype
        (dropout is the identity in eval mode)."""

        def __init__(self, base: Any, adapters: list[tuple[Any, Any, Any, float]]):
            super().__init__()
            self.base, self.adapters = base, adapters     # (A weight, B weight, B bias, scaling)

        def forward(self, x: Any) -> Any:
            result = self.base(x)
            dtype = result.dtype
            for a, b, b_bias, scaling in self.adapters:
                x = x.to(a.dtype)
                result = result + torch.nn.functional.linear(torch.nn.functional.linear(x, a), b, b_bias) * scaling
            return result.to(dtype)

    return LoraBesideLinear


def _linear(weight: Any, bias: Any, onednn: bool = False, frozen: Any = None,
            keep: PackedWeights | None = None) -> Any:
    """A module computing ``x W^T + b`` with tensors it holds as plain attributes (no parameters);
    ``frozen``: the parameter ``weight`` views, when the weight is not a new (folded) tensor, whose
    packed copy ``keep`` may hold."""
    return _folded_linear_class()(weight, bias, onednn, frozen, keep)


def _folded(module: Any, adapter: bool, onednn: bool = False, keep: PackedWeights | None = None) -> Any:
    """The stand-in for one LoRA ``Linear`` wrapper: its base layer (adapter off; a :func:`_linear`
    over the base's own tensors with ``onednn``), or a linear layer whose weight is base + the active
    adapters' delta, a new tensor (the base is not written)."""
    base = module.base_layer
    if not adapter:
        return _linear(base.weight.detach(), _detached(base.bias), onednn, base.weight, keep) if onednn else base
    if onednn and lora_beside_enabled():
        adapters = [(module.lora_A[n].weight.detach(), module.lora_B[n].weight.detach(),
                     _detached(module.lora_B[n].bias), module.scaling[n])
                    for n in module.active_adapters if n in module.lora_A]
        return _lora_beside_class()(_linear(base.weight.detach(), _detached(base.bias), onednn, base.weight, keep),
                                    adapters)
    weight = base.weight.detach()
    for name in module.active_adapters:
        if name in module.lora_A:
            weight = weight + lora_delta(module, name).to(weight.dtype)
    return _linear(weight, _detached(base.bias), onednn)


def lora_delta(module: Any, name: str) -> Any:
    """PEFT's ``get_delta_weight(name)`` (``B A * scaling``), detached, bit for bit, cheaper where it can be.

    With fp32 factors and a power-of-two scaling (``alpha / r`` = 2 in the shipped recipes)
    ``(B * scaling) A`` is exactly ``(B A) * scaling``: scaling by 2^k shifts every product and partial
    sum's exponent and rounds nothing (short of overflow or subnormals, which LoRA factors do not
    reach). So the scaling multiplies the r-wide factor instead of the full [out, in] product, a pass
    over each folded weight saved per MSD step (the 0.5B demo folds 168 layers a step)."""
    import torch

    from polyalign.models.lora_add import power_of_two

    a, b, scaling = module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name]
    exact = (a.dtype == b.dtype == torch.float32 and not getattr(module, "fan_in_fan_out", False)
             and power_of_two(scaling))
    if not exact:
        return module.get_delta_weight(name).detach()
    return (b.detach() * scaling) @ a.detach()


def _detached(t: Any) -> Any:
    return None if t is None else t.detach()


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
    with _swapped_for_generation(model, adapter, onednn=False):
        yield


@contextlib.contextmanager
def decoding_linears(model: Any, adapter: bool = True, keep: PackedWeights | None = None) -> Iterator[None]:
    """:func:`folded_lora`, and on a CPU with the base in fp32 (or in bf16 where the CPU has it natively,
    :func:`onednn_dtypes`) every linear layer (the LM head too, and every layer of
    a model without an adapter) computed by oneDNN while it multiplies few rows: the decode steps of
    ``generate`` (:data:`ONEDNN_MAX_ROWS`; prefills stay with MKL). Same products up to fp32 rounding;
    the layers' own tensors serve prefills, and a copy packed in oneDNN's layout the decode steps (one
    more copy of the weights while generating; ``keep`` holds frozen layers' copies for the owner's
    next generation, :class:`PackedWeights`); every module is put back on exit.
    Off (plain :func:`folded_lora`) where :func:`onednn_decoding_enabled` says so, on a GPU, or in
    another dtype."""
    params = list(model.parameters())
    base = [p for n, p in model.named_parameters() if "lora_" not in n]    # the adapter (fp32) is folded in
    onednn = (onednn_decoding_enabled() and bool(base) and all(p.device.type == "cpu" for p in params)
              and len({p.dtype for p in base}) == 1 and base[0].dtype in onednn_dtypes())
    with _swapped_for_generation(model, adapter, onednn, keep):
        yield


@contextlib.contextmanager
def _swapped_for_generation(model: Any, adapter: bool, onednn: bool, keep: PackedWeights | None = None) -> Iterator[None]:
    import torch

    from polyalign.models.adapters import is_peft

    swapped = []                      # (parent, attribute, module put back on exit, its stand-in)
    lora_cls = None
    if is_peft(model):
        from peft.tuners.lora.layer import Linear as lora_cls
    inside_wrappers: set[str] = set()
    for name, m in list(model.named_modules()):
        parent_name, _, attr = name.rpartition(".")
        if lora_cls is not None and hasattr(m, "base_layer"):
            inside_wrappers.add(name + ".")
        if any(name.startswith(w) for w in inside_wrappers):
            continue                   # a wrapper's own base layer / adapter layers: the wrapper decides
        if lora_cls is not None and type(m) is lora_cls:
            if (m.merged or m.lora_variant or getattr(m, "fan_in_fan_out", False)
                    or type(m.base_layer).__name__ != "Linear"):
                continue
            stand_in = _folded(m, adapter and not m.disable_adapters, onednn, keep)
        elif onednn and type(m) is torch.nn.Linear:
            stand_in = _linear(m.weight.detach(), _detached(m.bias), True, m.weight, keep)
        else:
            continue
        swapped.append((model.get_submodule(parent_name) if parent_name else model, attr, m, stand_in))
    try:
        for parent, attr, _, stand_in in swapped:
            setattr(parent, attr, stand_in)
        yield
    finally:
        for parent, attr, m, _ in reversed(swapped):
            setattr(parent, attr, m)
