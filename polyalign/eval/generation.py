"""Batched generation with a resumable on-disk cache.

Every finished generation is appended (and flushed) to ``generations.jsonl`` under a key of
(weights fingerprint, prompt id, language, settings, prompt text), so an interrupted run resumes
without regenerating and a rerun generates nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from polyalign.cache import JsonlCache, drop_partial_tail  # noqa: F401 (drop_partial_tail: old import path)
from polyalign.errors import PolyalignError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 128
    do_sample: bool = False        # greedy by default (the papers' evaluation protocol)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None       # sampling only; None = whole vocabulary
    repetition_penalty: float = 1.0  # never inherited from the model's generation_config
    system: str | None = None      # optional system prompt for the chat template

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class GenRequest:
    prompt_id: str
    lang: str
    text: str


def cache_key(fingerprint: str, settings: GenerationSettings, req: GenRequest) -> str:
    return hashlib.sha256(json.dumps([fingerprint, settings.key(), req.prompt_id, req.lang, req.text]).encode()
                          ).hexdigest()[:24]


# One cache for every resumable loop (generations, verdicts, translations): polyalign/cache.py.
GenerationCache = JsonlCache


class HFGenerator:
    """Hugging Face ``generate`` in batches: chat template, left padding, KV cache, greedy."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 32):
        self.model, self.tok, self.batch_size = model, tokenizer, batch_size

    def generate(self, texts: list[str], settings: GenerationSettings) -> list[str]:
        import torch

        from polyalign.models.chat import render_prompt
        from polyalign.models.sampling import sampling_kwargs

        prompts = [render_prompt(self.tok, t, settings.system) for t in texts]
        old_side = self.tok.padding_side
        self.tok.padding_side = "left"     # new tokens must follow the prompt directly
        try:
            enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            self.tok.padding_side = old_side
        device = next(self.model.parameters()).device
        gen_kwargs = sampling_kwargs(settings.max_new_tokens, settings.temperature if settings.do_sample else 0.0,
                                     settings.top_p, pad_token_id=self.tok.pad_token_id, top_k=settings.top_k,
                                     repetition_penalty=settings.repetition_penalty)
        with torch.no_grad():
            out = self.model.generate(input_ids=enc["input_ids"].to(device),
                                      attention_mask=enc["attention_mask"].to(device), **gen_kwargs)
        new = out[:, enc["input_ids"].shape[1]:]
        return [self.tok.decode(row, skip_special_tokens=True).strip() for row in new]


class VLLMGenerator:
    """Optional vLLM backend (``pip install polyalign[vllm]``), for large evaluations on GPUs."""

    def __init__(self, model_spec: str, adapter: str | None = None, batch_size: int = 256):
        try:
            from vllm import LLM  # noqa: F401
        except ImportError:
            raise PolyalignError("the vllm backend needs vLLM: pip install 'polyalign[vllm]' (GPU machines)") from None
        from vllm import LLM

        from polyalign.models.loading import resolve_spec

        r = resolve_spec(model_spec)
        self.llm = LLM(model=r.location, enable_lora=adapter is not None)
        self.adapter = adapter
        self.batch_size = batch_size
        self.tok = self.llm.get_tokenizer()

    def generate(self, texts: list[str], settings: GenerationSettings) -> list[str]:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        from polyalign.models.chat import render_prompt

        params = SamplingParams(max_tokens=settings.max_new_tokens,
                                temperature=settings.temperature if settings.do_sample else 0.0, top_p=settings.top_p,
                                top_k=settings.top_k or -1, repetition_penalty=settings.repetition_penalty)
        lora = LoRARequest("adapter", 1, self.adapter) if self.adapter else None
        outs = self.llm.generate([render_prompt(self.tok, t, settings.system) for t in texts], params, lora_request=lora)
        return [o.outputs[0].text.strip() for o in outs]


def generate_cached(generator: Any, requests: list[GenRequest], settings: GenerationSettings, cache: GenerationCache,
                    fingerprint: str, progress: Callable[[int, int, float], None] | None = None) -> tuple[dict, int, int]:
    """Generate what the cache lacks, in length-sorted batches. Returns ({key: row}, generated, cached)."""
    keyed = [(cache_key(fingerprint, settings, r), r) for r in requests]
    todo = [(k, r) for k, r in dict(keyed).items() if k not in cache]
    cached = len(keyed) - len(todo)
    todo.sort(key=lambda kr: len(kr[1].text))      # similar lengths per batch: less padding
    done, tokens, start = 0, 0, time.perf_counter()
    bs = getattr(generator, "batch_size", 32)
    for i in range(0, len(todo), bs):
        batch = todo[i:i + bs]
        outputs = generator.generate([r.text for _, r in batch], settings)
        rows = [{"key": k, "prompt_id": r.prompt_id, "lang": r.lang, "prompt": r.text, "response": o,
                 "settings": settings.key(), "fingerprint": fingerprint} for (k, r), o in zip(batch, outputs)]
        cache.add(rows)
        done += len(batch)
        tokens += sum(len(o.split()) for o in outputs)
        if progress:
            progress(done, len(todo), tokens / max(time.perf_counter() - start, 1e-9))
    return {k: cache.rows[k] for k, _ in keyed}, len(todo), cached
