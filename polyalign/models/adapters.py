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


def _check_adapter_folder(adapter: Path) -> None:
    if not (adapter / "adapter_config.json").exists():
        raise ModelError(f"{adapter}: not a LoRA adapter folder (no adapter_config.json)")


def load_with_adapter(base_spec: str, adapter: str | Path | None, dtype: str | None = None,
                      trainable: bool = False, device: str | None = None):
    """Base model + optional PEFT adapter folder (or a full checkpoint folder as the spec).

    The adapter's weights stay in fp32 whatever the base dtype (PEFT's ``autocast_adapter_dtype``),
    so a bf16 base trains an fp32 adapter with fp32 optimizer state."""
    from polyalign.models.loading import load_model

    if adapter is None:
        return load_model(base_spec, dtype=dtype, device=device)
    return apply_adapter(load_model(base_spec, dtype=dtype, device=device), adapter, trainable)


def apply_adapter(model: Any, adapter: str | Path, trainable: bool = False):
    """Wrap a loaded base model with the adapter folder's LoRA weights (PEFT injects them in place)."""
    from peft import PeftModel

    adapter = Path(adapter)
    _check_adapter_folder(adapter)
    spec = getattr(model.config, "polyalign_spec", None)
    peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
    peft_model.config.polyalign_spec = spec
    return peft_model


def adapter_sha256(adapter: str | Path) -> str:
    """Hash of the adapter's weight file: names the exact adapter a result came from."""
    import hashlib

    adapter = Path(adapter)
    files = sorted(adapter.glob("adapter_model.*"))
    if not files:
        raise ModelError(f"{adapter}: no adapter_model.safetensors (or .bin) in the adapter folder")
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def carries_adapter(model: Any, adapter: str | Path, atol: float = 0.0) -> bool:
    """True when ``model`` is a PEFT model whose active LoRA weights equal those saved in ``adapter``."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    if not is_peft(model):
        return False
    adapter = Path(adapter)
    _check_adapter_folder(adapter)
    f = adapter / "adapter_model.safetensors"
    if not f.exists():
        return False
    saved = load_file(str(f))
    live = get_peft_model_state_dict(model)
    if set(saved) != set(live):
        return False
    return all(torch.allclose(saved[k].float(), live[k].detach().float().cpu(), atol=atol, rtol=0) for k in saved)


def merge_adapter(model: Any):
    """Fold LoRA weights into the base weights (for export)."""
    return model.merge_and_unload() if is_peft(model) else model
