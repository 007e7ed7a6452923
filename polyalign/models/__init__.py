"""Model loading (hub, folder, GGUF, built-ins), chat rendering, LoRA and checkpoints."""

from polyalign.models.adapters import (
    LoraSettings,
    attach_lora,
    load_with_adapter,
    lora_config,
    merge_adapter,
    save_checkpoint,
)
from polyalign.models.chat import prompt_ids, render_prompt
from polyalign.models.loading import load_model, load_tokenizer, resolve_spec, weights_fingerprint

__all__ = [
    "LoraSettings", "attach_lora", "load_model", "load_tokenizer", "load_with_adapter", "lora_config",
    "merge_adapter", "prompt_ids", "render_prompt", "resolve_spec", "save_checkpoint", "weights_fingerprint",
]
