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
from pathlib import Path
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

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 32, compact: bool = True):
        self.model, self.tok, self.batch_size = model, tokenizer, batch_size
        self.compact = compact     # greedy: ended rows leave the batch (polyalign.models.greedy)

    def prompt_length(self, text: str, settings: GenerationSettings) -> int:
        """Tokens of ``text``'s rendered prompt: what a batch is padded to, so what batches are sorted
        by. (Characters are a poor proxy across scripts: sorted by characters, the built-in test split's
        2601 prompts in nine languages were 40 % padding at 32 a batch; by tokens 1.4 %.)"""
        from polyalign.models.chat import render_prompt

        return len(self.tok(render_prompt(self.tok, text, settings.system), add_special_tokens=False)["input_ids"])

    def generate(self, texts: list[str], settings: GenerationSettings) -> list[str]:
        import torch

        from polyalign.models.batching import (
            cache_kwarg,
            can_share_head,
            left_pad,
            shared_head_cache,
            shared_head_kv,
            shared_head_length,
        )
        from polyalign.models.chat import render_prompt
        from polyalign.models.greedy import can_compact, eos_token_ids, greedy_ids
        from polyalign.models.sampling import sampling_kwargs

        prompts = [render_prompt(self.tok, t, settings.system) for t in texts]
        ids = self.tok(prompts, add_special_tokens=False)["input_ids"]
        if self.compact and not settings.do_sample and settings.repetition_penalty == 1.0 and can_compact(self.model):
            # Greedy: the template's head prefilled once, a row leaves the batch at its EOS (models/greedy.py)
            new = greedy_ids(self.model, ids, settings.max_new_tokens, eos_token_ids(self.model, self.tok),
                             self.tok.pad_token_id)
            return [self.tok.decode(row, skip_special_tokens=True).strip() for row in new]
        device = next(self.model.parameters()).device
        # The tokens every prompt starts with (the template's system turn) are prefilled once and
        # the rows continue from a copy (batching.shared_head_length); new tokens follow each prompt
        # directly: the rest of each prompt is left-padded after the head.
        n = shared_head_length(ids) if can_share_head(self.model) else 0
        rest, mask, pos = left_pad([s[n:] for s in ids], self.tok.pad_token_id)
        gen_kwargs = sampling_kwargs(settings.max_new_tokens, settings.temperature if settings.do_sample else 0.0,
                                     settings.top_p, pad_token_id=self.tok.pad_token_id, top_k=settings.top_k,
                                     repetition_penalty=settings.repetition_penalty)
        if n:
            with torch.no_grad():
                shared = shared_head_kv(self.model, ids[0][:n], device)
            gen_kwargs[cache_kwarg()] = shared_head_cache(shared, len(ids))
            rest = torch.cat([torch.tensor([ids[0][:n]] * len(ids), dtype=torch.long), rest], dim=1)
            mask = torch.cat([mask.new_ones(len(ids), n), mask], dim=1)
        with torch.no_grad():
            out = self.model.generate(input_ids=rest.to(device), attention_mask=mask.to(device), **gen_kwargs)
        new = out[:, rest.shape[1]:]
        return [self.tok.decode(row, skip_special_tokens=True).strip() for row in new]


# vLLM accepts these LoRA ranks only (vllm/config/lora.py); an adapter of rank r needs the next one up.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class VLLMSettings:
    """Engine options of the vLLM backend (``polyalign eval --vllm-*``, a sweep's ``eval:`` keys).

    Data parallelism is the launcher's: under ``accelerate launch --num_processes N`` (or torchrun)
    each group of ``tensor_parallel`` ranks is one engine (vLLM's ``external_launcher``, as TRL's
    colocate mode does it) and the N / ``tensor_parallel`` engines split the prompts.
    """

    tensor_parallel: int = 1               # GPUs per engine
    gpu_memory_utilization: float = 0.9    # share of each GPU the engine may take (weights + KV cache)
    max_lora_rank: int | None = None       # None: the adapter's own rank, rounded up to a rank vLLM takes
    max_model_len: int | None = None       # None: the model's context length
    dtype: str | None = None               # None/auto: the policy of polyalign.models.loading.default_dtype
    seed: int = 0


def lora_rank_for_vllm(adapter: str | Path, asked: int | None = None) -> int:
    """``max_lora_rank`` that fits ``adapter``: ``asked`` if given (checked), else the adapter's ``r``
    rounded up to the next rank vLLM accepts (vLLM's default, 16, rejects an r=64 adapter)."""
    cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
    ranks = [int(cfg.get("r", 8)), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())]
    need = max(ranks)
    if asked is not None:
        if asked < need:
            raise PolyalignError(f"vllm max_lora_rank {asked} is below the rank of {adapter} (r={need})")
        return asked
    fit = [r for r in VLLM_LORA_RANKS if r >= need]
    if not fit:
        raise PolyalignError(f"{adapter}: LoRA rank {need} exceeds the largest rank vLLM serves ({VLLM_LORA_RANKS[-1]})")
    return fit[0]


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise PolyalignError("the vllm backend needs vLLM: pip install 'polyalign[vllm]' (GPU machines)") from None
    return vllm


# One engine per engine-argument set, reused by every evaluation in the process (a sweep's tasks);
# vLLM keeps GPU memory until the engine is closed (:func:`close_vllm_engines`).
_ENGINES: dict[tuple, Any] = {}


def close_vllm_engines() -> None:
    """Shut down every cached vLLM engine and free its GPU memory (a sweep trains next)."""
    import gc

    for engine in _ENGINES.values():
        core = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
        if hasattr(core, "shutdown"):
            core.shutdown()
    _ENGINES.clear()
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


class VLLMGenerator:
    """vLLM backend (``pip install polyalign[vllm]``), for large evaluations on GPUs.

    Prompts go in as token ids from polyalign's own chat rendering (:func:`polyalign.models.chat.prompt_ids`),
    the same ids the ``hf`` backend feeds ``generate``: text prompts would be tokenized again by vLLM
    with ``add_special_tokens=True`` and Llama-3 / Gemma templates, which already hold BOS, would
    get a second one. The adapter is sent as a ``LoRARequest`` named and numbered by its sha256, so
    an adapter retrained into the same folder is loaded afresh, never served from vLLM's LoRA cache.

    Args:
        model_spec: base model (``builtin:NAME``, folder or hub id).
        adapter: PEFT LoRA folder, or None.
        batch_size: prompts per ``generate`` call (vLLM batches inside; large is fine).
        options: engine options.
        ranks_per_engine: >1 under a launcher with ``tensor_parallel`` > 1 (set by the runner).
        launched: True under ``accelerate launch`` / torchrun with several processes: the engine joins
            the launcher's process group (``distributed_executor_backend="external_launcher"``).
    """

    def __init__(self, model_spec: str, adapter: str | None = None, batch_size: int = 256,
                 options: VLLMSettings | None = None, launched: bool = False):
        vllm = _import_vllm()
        from polyalign.models.adapters import adapter_sha256
        from polyalign.models.loading import load_tokenizer, resolve_dtype, resolve_spec

        opts = options or VLLMSettings()
        r = resolve_spec(model_spec)
        if r.kind == "tiny" or r.gguf_file:
            raise PolyalignError(f"the vllm backend needs a safetensors model folder or hub id, not {model_spec!r}")
        self.adapter, self.batch_size, self.options = adapter, batch_size, opts
        self.adapter_sha = adapter_sha256(adapter) if adapter else None
        self.tok = load_tokenizer(model_spec)       # polyalign's chat rendering: what hf feeds generate
        self.ranks_per_engine = opts.tensor_parallel if launched else 1
        engine_args: dict[str, Any] = {
            "model": r.location, "tokenizer": r.location, "dtype": resolve_dtype(opts.dtype), "seed": opts.seed,
            "tensor_parallel_size": opts.tensor_parallel, "gpu_memory_utilization": opts.gpu_memory_utilization,
            "enable_lora": adapter is not None, "trust_remote_code": False,
        }
        if adapter is not None:
            engine_args["max_lora_rank"] = lora_rank_for_vllm(adapter, opts.max_lora_rank)
        if opts.max_model_len is not None:
            engine_args["max_model_len"] = opts.max_model_len
        if launched:
            engine_args["distributed_executor_backend"] = "external_launcher"
        key = tuple(sorted(engine_args.items()))
        if key not in _ENGINES:
            _ENGINES[key] = vllm.LLM(**engine_args)
        self.llm = _ENGINES[key]
        self.engine_args = engine_args

    def fingerprint(self, model_spec: str) -> str:
        """Cache key part: base spec, dtype and the adapter's content hash (never its path)."""
        return f"vllm:{model_spec}:{self.engine_args['dtype']}:{self.adapter_sha}"

    def generate(self, texts: list[str], settings: GenerationSettings) -> list[str]:
        vllm = _import_vllm()
        from vllm.lora.request import LoRARequest

        from polyalign.models.chat import prompt_ids

        params = vllm.SamplingParams(max_tokens=settings.max_new_tokens,
                                     temperature=settings.temperature if settings.do_sample else 0.0,
                                     top_p=settings.top_p if settings.do_sample else 1.0,
                                     top_k=(settings.top_k or -1) if settings.do_sample else -1,
                                     repetition_penalty=settings.repetition_penalty, seed=self.options.seed)
        lora = None
        if self.adapter:    # the id vLLM caches the loaded adapter under: one per content hash
            lora = LoRARequest(f"adapter-{self.adapter_sha}", int(self.adapter_sha[:7], 16) + 1, self.adapter)
        prompts = [{"prompt_token_ids": prompt_ids(self.tok, t, settings.system)} for t in texts]
        outs = self.llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outs]


def _local_share(batches: list[Any], state: Any, ranks_per_engine: int) -> list[Any]:
    """This rank's batches of one round: each batch once per rank of its engine, so that the
    ``ranks_per_engine`` ranks of a tensor-parallel vLLM engine send it the same prompts."""
    copies = [b for b in batches for _ in range(ranks_per_engine)]
    with state.split_between_processes(copies) as mine:
        return list(mine)


def generate_cached(generator: Any, requests: list[GenRequest], settings: GenerationSettings, cache: GenerationCache,
                    fingerprint: str, progress: Callable[[int, int, float], None] | None = None,
                    state: Any = None) -> tuple[dict, int, int]:
    """Generate what the cache lacks, in batches sorted by prompt length. Returns ({key: row}, generated, cached).

    Under ``accelerate launch`` (``state``: an accelerate ``PartialState`` with several processes)
    the main process alone reads and appends the cache; it sends the missing keys to every rank,
    the batches are dealt out one per engine per round (``split_between_processes``), and each
    round's rows come back with ``gather_object`` and are appended by the main process, in the
    order a single process would have written them. Batches keep their one-process composition,
    so the outputs equal a one-process run's, and each prompt is generated once.
    """
    keyed = [(cache_key(fingerprint, settings, r), r) for r in requests]
    todo = [(k, r) for k, r in dict(keyed).items() if k not in cache]
    distributed = state is not None and state.num_processes > 1
    if distributed:
        from accelerate.utils import broadcast_object_list

        todo = broadcast_object_list([todo], from_process=0)[0]   # the main process's cache decides
    cached = len(keyed) - len(todo)
    # Similar lengths per batch, less padding: in tokens where the generator can count them.
    length = getattr(generator, "prompt_length", None)
    todo.sort(key=(lambda kr: length(kr[1].text, settings)) if length else (lambda kr: len(kr[1].text)))
    done, tokens, start = 0, 0, time.perf_counter()
    bs = getattr(generator, "batch_size", 32)
    batches = [todo[i:i + bs] for i in range(0, len(todo), bs)]
    per_engine = getattr(generator, "ranks_per_engine", 1)
    engines = max(1, state.num_processes // per_engine) if distributed else 1
    for i in range(0, len(batches), engines):
        rounds = batches[i:i + engines]
        mine = _local_share(rounds, state, per_engine) if distributed else rounds
        rows = []
        for batch in mine:
            outputs = generator.generate([r.text for _, r in batch], settings)
            rows += [{"key": k, "prompt_id": r.prompt_id, "lang": r.lang, "prompt": r.text, "response": o,
                      "settings": settings.key(), "fingerprint": fingerprint} for (k, r), o in zip(batch, outputs)]
        if distributed:
            from accelerate.utils import gather_object

            lead = state.process_index % per_engine == 0      # one copy per engine
            rows = gather_object([rows if lead else []])
            rows = [row for part in rows for row in part] if state.is_main_process else []   # one writer
        cache.add(rows)
        done += sum(len(b) for b in rounds)
        tokens += sum(len(row["response"].split()) for row in rows)
        if progress:
            progress(done, len(todo), tokens / max(time.perf_counter() - start, 1e-9))
    if distributed and not state.is_main_process:
        return {}, len(todo), cached         # the main process alone holds every row and judges
    return {k: cache.rows[k] for k, _ in keyed}, len(todo), cached
