"""One path from a model spec to a model and tokenizer.

Specs: ``builtin:<name>`` (see :mod:`polyalign.models.builtin`), a local HF folder, a ``.gguf``
file, or a hub id (for users with hub access). Weights load from safetensors only and
``trust_remote_code`` is off unless asked for.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polyalign.errors import ModelError
from polyalign.models import builtin

log = logging.getLogger(__name__)
_TINY_CACHE: dict[str, Any] = {}


@dataclass(frozen=True)
class ResolvedSpec:
    kind: str          # "tiny" | "folder" | "gguf" | "hub"
    location: str      # folder, gguf parent folder or hub id
    gguf_file: str | None = None


def resolve_spec(spec: str) -> ResolvedSpec:
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name == "tiny-random":
            return ResolvedSpec("tiny", spec)
        if name not in builtin.BUILTIN_GGUF:
            raise ModelError(f"unknown built-in model {name!r}; known: {', '.join(builtin.BUILTIN_NAMES)}")
        return ResolvedSpec("folder", str(builtin.builtin_folder(name)))
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"{p}: GGUF file not found")
        return ResolvedSpec("gguf", str(p.parent), p.name)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelError(f"{p}: not a model folder (no config.json)")
        return ResolvedSpec("folder", str(p))
    if spec.startswith((".", "/", "~")) or p.exists():
        raise ModelError(f"{spec}: no such model folder or file")
    if spec.count("/") != 1:
        raise ModelError(f"{spec!r} is neither a local path, a .gguf file, a builtin: name nor a hub id (org/name)")
    return ResolvedSpec("hub", spec)


def clear_quantization_flags(model: Any) -> Any:
    """A GGUF-loaded model is dequantised to fp32 but still flagged quantized, which makes Trainer
    refuse to train it and save_pretrained write a quantization config: clear the flags."""
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property in some versions
            pass
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model


def load_tokenizer(spec: str, trust_remote_code: bool = False, padding_side: str = "left",
                   revision: str | None = None):
    """Tokenizer with a pad token (EOS if the model has none) and left padding for generation."""
    from transformers import AutoTokenizer

    r = resolve_spec(spec)
    if r.kind == "tiny":
        tok = builtin.build_tiny_tokenizer()
    else:
        extra = {"revision": revision} if revision else {}
        try:
            tok = AutoTokenizer.from_pretrained(r.location, gguf_file=r.gguf_file, trust_remote_code=trust_remote_code,
                                                **extra)
        except OSError as e:
            raise ModelError(f"cannot load tokenizer for {spec!r}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    if not getattr(tok, "chat_template", None):
        raise ModelError(f"{spec}: the tokenizer has no chat template; polyalign renders every prompt with one")
    return tok


DTYPES = ("float32", "bfloat16", "float16")


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX): there bf16 matmuls run 3-4x
    faster than fp32; without them oneDNN emulates bf16 and it is far *slower* than fp32 (measured
    on an AVX2-only EPYC: 0.2 vs 81 GFLOP/s, benchmarks/run.py's matmul peak)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:          # not Linux: no cheap way to tell, stay on fp32
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def default_dtype() -> str:
    """The dtype policy: bf16 where the hardware computes it fast, fp32 elsewhere.

    CUDA with bf16 support (Ampere and newer) or a CPU with AVX512-BF16/AMX -> ``bfloat16``;
    anything else -> ``float32`` (fp16 is never chosen for you: it overflows in training).
    ``POLYALIGN_DTYPE`` (a dtype name) overrides the policy for every command that is not given a
    dtype: the test suite pins ``float32`` there, so exact-value tests mean the same on every CPU.
    """
    import os

    import torch

    forced = os.environ.get("POLYALIGN_DTYPE", "").strip()
    if forced and forced != "auto":
        return resolve_dtype(forced)
    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if cpu_has_fast_bf16() else "float32"


def resolve_dtype(dtype: str | None) -> str:
    """``None`` or ``"auto"`` -> :func:`default_dtype`; otherwise a checked dtype name."""
    if dtype in (None, "auto"):
        return default_dtype()
    aliases = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "float": "float32", "half": "float16"}
    name = aliases.get(dtype, dtype)
    if name not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)} (or bf16, fp32, fp16)")
    return name


def local_device() -> str:
    """This process's own accelerator: ``cuda:<LOCAL_RANK>`` (torchrun and ``accelerate launch`` set
    LOCAL_RANK; 0 without a launcher), else ``cpu``. A plain ``cuda`` is the *current* device, cuda:0
    until someone calls ``set_device``: 8 ranks then each loaded a whole model onto GPU 0."""
    import os

    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0') or 0)}"


def default_device() -> str:
    """Where models go unless told otherwise: this rank's GPU (:func:`local_device`), else the CPU."""
    return local_device()


DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(device: str | None) -> str:
    """``None`` / ``"auto"`` -> :func:`default_device`; ``cuda`` -> this rank's GPU; an unknown device
    or ``cuda`` without a GPU is a one-line error."""
    import torch

    if device in (None, "auto"):
        return default_device()
    kind = device.split(":", 1)[0]
    if kind not in DEVICE_TYPES or not (device == kind or device.split(":", 1)[1].isdigit()):
        raise ModelError(f"--device {device}: unknown device; use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"--device {device}: this machine has no CUDA device (torch {torch.__version__})")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"--device {device}: this machine has no MPS device")
    return local_device() if device == "cuda" else device


def model_dtype(model: Any) -> str:
    """The dtype the model's weights are in (the base weights for a PEFT model), e.g. ``bfloat16``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return str(getattr(base, "dtype", next(base.parameters()).dtype)).removeprefix("torch.")


# glibc's malloc serves an allocation above its mmap threshold (dynamic, at most 32 MiB by default)
# with a fresh mapping and returns it to the kernel when freed, so every such tensor is page-faulted
# and zeroed anew: a bf16 [32, 137, 4864] product (42 MiB, the MLP of an evaluation batch's
# prefill) took 15.7 ms to multiply into fresh memory against 5.3 ms into memory used before (an
# Intel Xeon with AMX, 2026-12-06; benchmarks/allocator.py measures the step and the evaluation).
_MMAP_THRESHOLD_BYTES = 1 << 30      # allocations up to 1 GiB come from the heap, freed ones are reused
_TRIM_THRESHOLD_BYTES = 1 << 30      # up to 1 GiB of free heap top is kept instead of returned


@functools.cache
def keep_freed_cpu_memory() -> bool:
    """Tell glibc's malloc to reuse freed large blocks instead of unmapping them (``mallopt``), once a
    process; True when set. Why: CPU training and generation allocate the same large activations
    step after step, and a fresh mapping costs its page faults every time. The price: up to 1 GiB of
    freed memory stays resident. ``POLYALIGN_CPU_MALLOC=default`` (or a libc other than glibc) leaves
    malloc as it is; ``MALLOC_*`` / ``GLIBC_TUNABLES`` set by the user win (nothing is changed)."""
    ok = False
    user_set = any(k.startswith("MALLOC_") for k in os.environ) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
    if os.environ.get("POLYALIGN_CPU_MALLOC", "keep") != "default" and not user_set:
        libc = _glibc()
        if libc is not None:
            M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3                 # <malloc.h>
            # a glibc that caps the mmap threshold (32 MiB, HEAP_MAX_SIZE / 2, in older ones) refuses 1 GiB: take the cap
            ok = bool((libc.mallopt(M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
                       or libc.mallopt(M_MMAP_THRESHOLD, 32 << 20))
                      and libc.mallopt(M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))
    log.debug("glibc malloc keeps freed blocks: %s", ok)
    return ok


def release_freed_cpu_memory() -> bool:
    """Collect unreachable objects and hand the heap's free memory back to the system (glibc's
    ``malloc_trim``); True when trimmed. Why: with :func:`keep_freed_cpu_memory` a long job's freed
    blocks stay resident, so a process that trains and then evaluates holds training's high-water mark
    through the evaluation (a 1.5B sweep point: 21 GB resident while evaluating, against ~15 GB for
    its training, on 2026-12-06). Call it between such phases, not inside one."""
    import gc

    gc.collect()
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))


def _glibc() -> Any:
    """glibc's C library through ctypes, or None on another libc (musl, macOS, Windows)."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def load_model(spec: str, dtype: str | None = None, trust_remote_code: bool = False, device: str | None = None,
               revision: str | None = None, attn_implementation: str | None = None):
    """Causal LM for ``spec`` in eval mode, on ``device`` (default: this rank's GPU when present, else
    CPU) in ``dtype`` (default: :func:`default_dtype`, bf16 where the hardware does it fast).

    Weights go straight to ``device`` through ``device_map`` (no CPU copy moved afterwards). ``cpu``
    loads without a device_map, as ZeRO-3's ``zero.Init`` and FSDP's ``cpu_ram_efficient_loading``
    need: they place the weights themselves. ``revision`` and ``attn_implementation`` (``sdpa``,
    ``flash_attention_2``, ``eager``) go to ``from_pretrained``; ``trust_remote_code`` stays off
    unless asked for."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    torch_dtype = getattr(torch, dtype)
    r = resolve_spec(spec)
    if device == "cpu":
        keep_freed_cpu_memory()
    if r.kind == "tiny":
        model = builtin.build_tiny_model(builtin.build_tiny_tokenizer()).to(torch_dtype)
        if device != "cpu":
            model.to(device)
    else:
        # transformers 5.2x turns on the hub's `kernels` by default on CUDA: code fetched from the hub at
        # load time, which fails on an offline cluster (seen on an H200, 2026-12-04) and is remote code
        # like trust_remote_code. Off unless POLYALIGN_HUB_KERNELS=1.
        kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code,
                                  "use_kernels": os.environ.get("POLYALIGN_HUB_KERNELS", "") == "1"}
        if device != "cpu":
            kwargs["device_map"] = {"": device}
        if revision:
            kwargs["revision"] = revision
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if r.gguf_file:
            kwargs["gguf_file"] = r.gguf_file
        else:
            kwargs["use_safetensors"] = True
        try:
            model = AutoModelForCausalLM.from_pretrained(r.location, **kwargs)
        except (OSError, ValueError) as e:          # ValueError: an attn_implementation this model lacks
            raise ModelError(f"cannot load model {spec!r}: {e}") from None
        if r.gguf_file:
            clear_quantization_flags(model)
    model.config.polyalign_spec = spec
    contiguous_head_input(model)
    return model.eval()


def canonical_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a freshly allocated row-major tensor of ``shape``."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def contiguous_head_input(model: Any) -> None:
    """Make the LM head's input contiguous (a forward pre-hook; idempotent).

    Why: generation's first step feeds the head ``hidden[:, -1:, :]``, a strided view. With a frozen
    head weight (any LoRA or adapter model: ``requires_grad=False``) torch's CPU matmul then takes a
    batched path that expands the [V, H] weight once per row: for Qwen2.5-0.5B at batch 32 a copy of
    32 x 151,936 x 896 bf16 values (8.7 GB, ~17 s) per ``generate`` call, which made every adapter
    evaluation 3-5x slower than the base model's (benchmarks/precision.py, ``eval_adapter_vs_base``)
    and would not fit in memory for the 1.5B model. A contiguous input takes the plain 2-D matmul.

    "Contiguous" means the canonical strides, not ``Tensor.is_contiguous()``: a [1, 1, H] slice of a
    [1, T, H] state keeps stride T x H in its size-1 batch dimension, counts as contiguous, and still
    takes the batched path (a copy of the whole [H, V] weight, 0.7 s in bf16 for the 0.5B model's
    head: the MSD step's one-row length groups paid it five times a step; ``benchmarks/msd_profile.py
    --ops``, 2026-12-06). Such an input is cloned (1 x H values)."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "_polyalign_contiguous", False):
        return

    def hook(_module: Any, args: tuple) -> tuple:
        if not args or not hasattr(args[0], "stride"):
            return args
        x = args[0]
        return (x, *args[1:]) if x.stride() == canonical_strides(x.shape) else \
            (x.clone(memory_format=torch.contiguous_format), *args[1:])

    head.register_forward_pre_hook(hook)
    head._polyalign_contiguous = True


def weights_fingerprint(model: Any) -> str:
    """Short content hash of the trainable state (adapter), the base spec and the dtype: keys the
    evaluation cache, so different weights never share cached generations."""
    h = hashlib.sha256(str(getattr(model.config, "polyalign_spec", type(model).__name__)).encode())
    h.update(model_dtype(model).encode())    # bf16 and fp32 greedy outputs differ: never share a cache
    state = model.state_dict()
    # LoRA adapters hold all that training changes; hash them fully. Base weights: sample a few
    # tensors (hashing 2 GB per eval is too slow) -- the spec above already names them.
    keys = sorted(state)
    lora = [k for k in keys if "lora_" in k]
    chosen = lora or keys[:: max(1, len(keys) // 8)]
    for k in chosen:
        t = state[k].detach().float().cpu().contiguous()
        h.update(k.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def describe(spec: str) -> dict[str, Any]:
    """Provenance for reports: the spec and, for a local folder, its config's model type."""
    r = resolve_spec(spec)
    info: dict[str, Any] = {"spec": spec, "kind": r.kind}
    cfg = Path(r.location) / "config.json"
    if cfg.exists():
        info["model_type"] = json.loads(cfg.read_text()).get("model_type")
    return info
