"""Memory per GPU of an MSD run, computed from the model's size (docs/scale.md's table).

    python scripts/memory_per_gpu.py                       # Qwen2.5-7B-Instruct, 8 GPUs
    python scripts/memory_per_gpu.py --params 8.03e9 --layers 32 --hidden 4096 --intermediate 14336 \\
        --kv-heads 8 --heads 32 --vocab 128256 --gpus 4  # Llama-3.1-8B-Instruct

Counted: weights, gradients and AdamW state (bytes per parameter below), the frozen teacher, and the
[B, R, V] logits the unfused loss holds (student and teacher in bf16, plus their fp32 log-softmax).
Not counted: activations (batch, length and gradient checkpointing decide them), CUDA context and
allocator slack, vLLM's share (``msd.vllm_gpu_memory_utilization`` of the card in colocate mode).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Model:
    params: float = 7.62e9          # Qwen2.5-7B-Instruct (config.json)
    layers: int = 28
    hidden: int = 3584
    intermediate: int = 18944
    heads: int = 28
    kv_heads: int = 4
    vocab: int = 152064


def lora_params(m: Model, r: int) -> int:
    """LoRA on every linear layer of every block: r x (in + out) per matrix."""
    kv = m.hidden // m.heads * m.kv_heads
    shapes = [(m.hidden, m.hidden), (m.hidden, kv), (m.hidden, kv), (m.hidden, m.hidden),
              (m.hidden, m.intermediate), (m.hidden, m.intermediate), (m.intermediate, m.hidden)]
    return m.layers * sum(r * (a + b) for a, b in shapes)


def plan(m: Model, gpus: int, lora_r: int = 16, batch: int = 4, response: int = 256) -> dict[str, dict[str, float]]:
    """GB per GPU, per engine. LoRA: bf16 base (2 B/param), the teacher is the same weights with the
    adapter off, the adapter fp32 with its gradient and AdamW moments (16 B/param). Full fine-tuning
    (polyalign's precision policy): fp32 weights 4 + fp32 gradients 4 + AdamW moments 8 = 16 B/param,
    plus a frozen bf16 teacher (2 B/param); ZeRO-3 and FSDP FULL_SHARD divide both by the GPUs."""
    logits = batch * response * m.vocab * (2 + 2 + 4 + 4) / GB       # student + teacher, bf16 + fp32 log-softmax
    lora = lora_params(m, lora_r) * 16 / GB
    rows = {
        "DDP, LoRA": {"weights+optimizer": 2 * m.params / GB + lora, "teacher": 0.0},
        "DDP, full": {"weights+optimizer": 16 * m.params / GB, "teacher": 2 * m.params / GB},
        "ZeRO-3, full": {"weights+optimizer": 16 * m.params / GB / gpus, "teacher": 2 * m.params / GB / gpus},
        "FSDP FULL_SHARD, full": {"weights+optimizer": 16 * m.params / GB / gpus, "teacher": 2 * m.params / GB / gpus},
    }
    for r in rows.values():
        r["logits, unfused"] = logits
        r["total, fused head"] = r["weights+optimizer"] + r["teacher"]
        r["total, unfused"] = r["total, fused head"] + logits
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Model()
    for f in ("params", "layers", "hidden", "intermediate", "heads", "kv_heads", "vocab"):
        p.add_argument("--" + f.replace("_", "-"), type=type(getattr(d, f)), default=getattr(d, f))
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--batch", type=int, default=4, help="micro-batch per GPU")
    p.add_argument("--response", type=int, default=256, help="sampled tokens")
    a = p.parse_args()
    m = Model(a.params, a.layers, a.hidden, a.intermediate, a.heads, a.kv_heads, a.vocab)
    rows = plan(m, a.gpus, a.lora_r, a.batch, a.response)
    cols = ["weights+optimizer", "teacher", "logits, unfused", "total, fused head", "total, unfused"]
    print(f"# {m.params / 1e9:.2f}B parameters, {a.gpus} GPUs, LoRA r={a.lora_r} "
          f"({lora_params(m, a.lora_r) / 1e6:.1f}M), micro-batch {a.batch} x {a.response} tokens; GB per GPU")
    print("| engine | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
