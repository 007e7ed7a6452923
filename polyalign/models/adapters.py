"""LoRA via PEFT, and checkpoints = adapter (or full weights) + any extra heads (e.g. the MLC head)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polyalign.errors import ModelError

EXTRA_HEADS_FILE = "polyalign_heads.safetensors"
CHECKPOINT_INFO = "polyalign_checkpoint.json"


@dataclass
class LoraSettings:
    """PEFT LoRA settings. ``target_modules="all-linear"`` adapts every linear layer but the LM head."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    extra: dict[str, Any] = field(default_factory=dict)


def lora_config(settings: LoraSettings | None = None):
    """The PEFT ``LoraConfig`` for these settings (also what TRL trainers take as ``peft_config``)."""
    from peft import LoraConfig

    s = settings or LoraSettings()
    return LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=s.target_modules,
                      task_type="CAUSAL_LM", **s.extra)


def attach_lora(model: Any, settings: LoraSettings | None = None):
    from peft import get_peft_model

    return get_peft_model(model, lora_config(settings))


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def save_checkpoint(model: Any, out_dir: str | Path, tokenizer: Any = None,
                    heads: dict[str, Any] | None = None, info: dict[str, Any] | None = None) -> Path:
    """Adapter (PEFT) or full model in safetensors, extra heads, tokenizer, and provenance."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if heads:
        tensors = {f"{name}.{k}": v.detach().cpu().contiguous() for name, mod in heads.items()
                   for k, v in mod.state_dict().items()}
        save_file(tensors, str(out / EXTRA_HEADS_FILE))
    base = getattr(getattr(model, "config", None), "polyalign_spec", None)
    if is_peft(model):
        base = getattr(model.get_base_model().config, "polyalign_spec", base)
    (out / CHECKPOINT_INFO).write_text(json.dumps({"base_model": base, "adapter": is_peft(model), **(info or {})},
                                                  indent=1, default=str))
    return out


def load_heads(ckpt: str | Path, heads: dict[str, Any]) -> None:
    """Load saved extra heads into the given modules (strict: every key must match)."""
    from safetensors.torch import load_file

    f = Path(ckpt) / EXTRA_HEADS_FILE
    if not f.exists():
        raise ModelError(f"{ckpt}: no {EXTRA_HEADS_FILE} (checkpoint saved without heads)")
    tensors = load_file(str(f))
    for name, mod in heads.items():
        sub = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        mod.load_state_dict(sub, strict=True)


def load_with_adapter(base_spec: str, adapter: str | Path | None, dtype: str | None = None,
                      trainable: bool = False):
    """Base model + optional PEFT adapter folder (or a full checkpoint folder as the spec)."""
    from polyalign.models.loading import load_model

    if adapter is None:
        return load_model(base_spec, dtype=dtype)
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").exists():
        raise ModelError(f"{adapter}: not a LoRA adapter folder (no adapter_config.json)")
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base_spec, dtype=dtype), str(adapter), is_trainable=trainable)
    model.config.polyalign_spec = base_spec
    return model


def merge_adapter(model: Any):
    """Fold LoRA weights into the base weights (for export)."""
    return model.merge_and_unload() if is_peft(model) else model
