"""One path from a model spec to a model and tokenizer.

Specs: ``builtin:<name>`` (see :mod:`polyalign.models.builtin`), a local HF folder, a ``.gguf``
file, or a hub id (for users with hub access). Weights load from safetensors only and
``trust_remote_code`` is off unless asked for.
"""

from __future__ import annotations

import hashlib
import json
import logging
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


def load_tokenizer(spec: str, trust_remote_code: bool = False, padding_side: str = "left"):
    """Tokenizer with a pad token (EOS if the model has none) and left padding for generation."""
    from transformers import AutoTokenizer

    r = resolve_spec(spec)
    if r.kind == "tiny":
        tok = builtin.build_tiny_tokenizer()
    else:
        try:
            tok = AutoTokenizer.from_pretrained(r.location, gguf_file=r.gguf_file, trust_remote_code=trust_remote_code)
        except OSError as e:
            raise ModelError(f"cannot load tokenizer for {spec!r}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    if not getattr(tok, "chat_template", None):
        raise ModelError(f"{spec}: the tokenizer has no chat template; polyalign renders every prompt with one")
    return tok


def load_model(spec: str, dtype: str | None = None, trust_remote_code: bool = False, device: str | None = None):
    """Causal LM for ``spec`` in ``dtype`` ("float32", "bfloat16", "float16"; default: float32 on CPU,
    bfloat16 on GPU), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    if dtype is None:
        dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    torch_dtype = getattr(torch, dtype)
    r = resolve_spec(spec)
    if r.kind == "tiny":
        model = builtin.build_tiny_model(builtin.build_tiny_tokenizer()).to(torch_dtype)
    else:
        kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
        if r.gguf_file:
            kwargs["gguf_file"] = r.gguf_file
        else:
            kwargs["use_safetensors"] = True
        try:
            model = AutoModelForCausalLM.from_pretrained(r.location, **kwargs)
        except OSError as e:
            raise ModelError(f"cannot load model {spec!r}: {e}") from None
        if r.gguf_file:
            clear_quantization_flags(model)
    model.config.polyalign_spec = spec
    if device:
        model.to(device)
    return model.eval()


def weights_fingerprint(model: Any) -> str:
    """Short content hash of the trainable state (adapter) plus the base spec: keys the
    evaluation cache, so different weights never share cached generations."""
    h = hashlib.sha256(str(getattr(model.config, "polyalign_spec", type(model).__name__)).encode())
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
