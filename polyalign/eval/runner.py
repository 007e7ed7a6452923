"""``polyalign eval``: load task -> generate (cached) -> judge -> metrics -> results.json + report."""

from __future__ import annotations

import contextlib
import json
import platform
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from polyalign.data.builtin import finest_category
from polyalign.data.records import ParallelRecord, atomic_write_text
from polyalign.errors import PolyalignError, require_positive
from polyalign.eval import metrics
from polyalign.eval.generation import (
    GenerationCache,
    GenerationSettings,
    GenRequest,
    HFGenerator,
    VLLMSettings,
    generate_cached,
)
from polyalign.eval.judges import JudgeItem, build_judge
from polyalign.eval.tasks import get_task
from polyalign.models.sampling import decoding_linears
from polyalign.text.langid import in_language
from polyalign.text.languages import parse_language_list

SCHEMA_VERSION = 1
# Prompts per generate call when --batch-size is not given. CPU: on 2 cores batch 32 gives 10.9x the
# decode tokens/s of batch 1 (decode_scaling.py), and bf16 outputs depend a little on the batch, so
# it stays the CPU default. GPU: the KV cache of 128 prompts x 400 tokens is 6.7 GB in bf16 for
# Llama-3.1-8B (2.9 GB for Qwen2.5-7B), small next to the weights, and decode is memory-bound. vLLM
# schedules inside each call: one call of 512 keeps its batches full.
DEFAULT_BATCH_SIZES = {"cpu": 32, "accelerator": 128, "vllm": 512}


@dataclass
class EvalConfig:
    """One evaluation run. ``out`` holds results.json, generations.jsonl (the cache), judged.jsonl,
    report.md and plot.png; rerunning with the same ``out`` reuses every cached generation."""

    model: str
    task: str = "builtin-harmful"
    out: str = "runs/eval"
    adapter: str | None = None
    data: str | None = None              # always a path (file, or the folder a data set ships as)
    split: str | None = None             # train | dev | test | all (default dev; "eval" = dev): meta.split, else a hash of the id
    columns: str | dict[str, str] | None = None   # own CSV/JSONL: "en=question,th=q_th"
    judge: str = "lexicon"
    languages: str | list[str] | None = None
    limit: int | None = None             # prompts per language
    max_new_tokens: int | None = None    # None: the task's default (Task.max_new_tokens)
    batch_size: int | None = None        # None: DEFAULT_BATCH_SIZES for the backend and device
    backend: str = "hf"                  # hf | vllm
    system: str | None = None
    seed: int = 0
    dtype: str | None = None             # None/auto: bf16 where the hardware does it fast, else fp32
    device: str | None = None            # None/auto: CUDA when present (each rank's own GPU under a launcher)
    # backend vllm: engine options (generation.VLLMSettings); data parallel = launcher ranks / tensor parallel
    vllm_tensor_parallel: int = 1
    vllm_gpu_memory_utilization: float = 0.9
    vllm_max_lora_rank: int | None = None    # None: the adapter's rank, rounded up to one vLLM serves
    vllm_max_model_len: int | None = None

    def __post_init__(self) -> None:
        require_positive(limit=self.limit, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                         vllm_tensor_parallel=self.vllm_tensor_parallel, vllm_max_lora_rank=self.vllm_max_lora_rank,
                         vllm_max_model_len=self.vllm_max_model_len)
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise PolyalignError(f"--vllm-gpu-memory-utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        if self.backend not in ("hf", "vllm"):
            raise PolyalignError(f"unknown backend {self.backend!r}; use hf or vllm")

    def vllm_settings(self) -> VLLMSettings:
        return VLLMSettings(tensor_parallel=self.vllm_tensor_parallel,
                            gpu_memory_utilization=self.vllm_gpu_memory_utilization,
                            max_lora_rank=self.vllm_max_lora_rank, max_model_len=self.vllm_max_model_len,
                            dtype=self.dtype, seed=self.seed)


def select_requests(records: list[ParallelRecord], languages: list[str] | None, limit: int | None) -> list[GenRequest]:
    """Per language, the first ``limit`` records that have it (records keep their file order)."""
    langs = languages or list(dict.fromkeys(lang for r in records for lang in r.texts))
    out = []
    for lang in langs:
        have = [r for r in records if lang in r.texts][: limit or None]
        out += [GenRequest(r.id, lang, r.texts[lang]) for r in have]
    if not out:
        raise PolyalignError(f"no prompts for languages {langs}")
    return out


def provenance(cfg: EvalConfig | None = None) -> dict[str, Any]:
    import torch
    import transformers

    from polyalign import __version__

    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        git = None
    return {"polyalign": __version__, "git": git, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "config": asdict(cfg) if cfg else None}


def batch_size(cfg: EvalConfig, model: Any) -> int:
    """``cfg.batch_size``, else the default for the backend and the device the model is on."""
    if cfg.batch_size is not None:
        return cfg.batch_size
    if cfg.backend == "vllm":
        return DEFAULT_BATCH_SIZES["vllm"]
    on_cpu = model is None or next(model.parameters()).device.type == "cpu"
    return DEFAULT_BATCH_SIZES["cpu" if on_cpu else "accelerator"]


def _progress(show: bool = True):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[rate]}"), transient=False, disable=not show)


def _with_adapter(cfg: EvalConfig, model: Any) -> tuple[Any, bool]:
    """The model that must generate for ``cfg``: (model, whether we wrapped it).

    A passed-in model without PEFT gets ``cfg.adapter`` applied (and removed again afterwards); a
    PEFT model must carry exactly that adapter's weights, else the run would describe other weights.
    """
    from polyalign.models.adapters import apply_adapter, carries_adapter, is_peft

    if cfg.adapter is None:
        return model, False
    if not is_peft(model):
        return apply_adapter(model, cfg.adapter), True
    if not carries_adapter(model, cfg.adapter):
        raise PolyalignError(f"the model passed to run_eval carries a different adapter than {cfg.adapter}; "
                             "pass the base model (the adapter is applied) or the model trained into it")
    return model, False


def process_state(device: str | None = None) -> Any:
    """accelerate's ``PartialState``: several processes under ``accelerate launch`` / torchrun, one
    otherwise. Without CUDA (or with ``--device cpu``) the ranks talk over gloo."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available() or (device or "").startswith("cpu"))


def rank_device(device: str | None, state: Any) -> str | None:
    """Where this rank's model goes: the asked device, or under a launcher each rank's own
    accelerator (``cuda:<local rank>``), never every rank on cuda:0."""
    if device not in (None, "auto") or state.num_processes == 1:
        return device
    return "cpu" if state.device.type == "cpu" else str(state.device)


def run_eval(cfg: EvalConfig, model: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """Run one evaluation; ``model``/``tokenizer`` may be passed in to reuse loaded weights.

    With ``cfg.adapter`` set, a passed-in base model gets the adapter for this run only, and a
    passed-in PEFT model must carry that adapter (checked weight by weight).

    Under ``accelerate launch`` every rank loads its own copy on its own device and generates its
    share of the prompts (:func:`~polyalign.eval.generation.generate_cached`); the main process
    judges and writes every file, and every rank returns the same results."""
    task = get_task(cfg.task)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    languages = parse_language_list(cfg.languages)
    records = task.load(cfg.data, cfg.split, cfg.columns)
    state = process_state(cfg.device)

    wrapped = False
    if model is None:
        from polyalign.models import load_tokenizer, load_with_adapter

        tokenizer = load_tokenizer(cfg.model)
        if cfg.backend != "vllm":
            model = load_with_adapter(cfg.model, cfg.adapter, dtype=cfg.dtype, device=rank_device(cfg.device, state))
    elif cfg.backend == "hf":
        model, wrapped = _with_adapter(cfg, model)
    try:
        results = _run_loaded(cfg, task, records, languages, model, tokenizer, out, state)
    finally:
        if wrapped:
            model.unload()      # the caller's base model leaves exactly as it came in
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        results = broadcast_object_list([results], from_process=0)[0]
    return results


def _run_loaded(cfg: EvalConfig, task: Any, records: list[ParallelRecord], languages: list[str] | None,
                model: Any, tokenizer: Any, out: Path, state: Any) -> dict[str, Any] | None:
    """Generate (every rank its share), then judge and write (the main process); None on the others."""
    if task.kind == "mmlu":
        return _run_mmlu(cfg, task, records, model, tokenizer, out) if state.is_main_process else None

    from polyalign.models.loading import weights_fingerprint

    requests = select_requests(records, languages, cfg.limit)
    settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens or task.max_new_tokens, system=cfg.system)
    if cfg.backend == "vllm":
        from polyalign.eval.generation import VLLMGenerator

        if state.num_processes > 1 and state.num_processes % cfg.vllm_tensor_parallel:
            raise PolyalignError(f"--vllm-tensor-parallel {cfg.vllm_tensor_parallel} does not divide the "
                                 f"{state.num_processes} launched processes (each engine takes that many ranks)")
        generator: Any = VLLMGenerator(cfg.model, cfg.adapter, batch_size(cfg, None), cfg.vllm_settings(),
                                       launched=state.num_processes > 1)
        fingerprint = generator.fingerprint(cfg.model)  # the adapter's sha256, never its path
    else:
        generator = HFGenerator(model, tokenizer, batch_size(cfg, model))
        fingerprint = weights_fingerprint(model)       # what generates: base spec, dtype, adapter weights
    # One writer: the main process alone reads and appends the cache (the others keep theirs in memory).
    cache = GenerationCache(out / "generations.jsonl" if state.is_main_process else None)
    with (_progress(state.is_main_process) as prog, merged_for_generation(model if cfg.backend == "hf" else None),
          decoding_linears(model) if cfg.backend == "hf" else contextlib.nullcontext()):
        bar = prog.add_task(f"generate {cfg.task}", total=None, rate="")

        def tick(done: int, total: int, rate: float) -> None:
            prog.update(bar, completed=done, total=total, rate=f"{rate:.1f} words/s")
        rows, generated, cached = generate_cached(generator, requests, settings, cache, fingerprint, tick, state)
    if not state.is_main_process:
        return None

    by_req = [(r, rows[k]) for r, k in zip(requests, rows)]
    judge = build_judge(cfg.judge, out / "verdicts.jsonl")
    verdicts = judge.judge([JudgeItem(r.text, row["response"], r.lang) for r, row in by_req])
    record_meta = {r.id: r for r in records}
    judged = []
    for (req, row), v in zip(by_req, verdicts):
        item = {"prompt_id": req.prompt_id, "lang": req.lang, "category": finest_category(record_meta[req.prompt_id]),
                "prompt": req.text, "response": row["response"],
                **v.to_json(), "in_language": in_language(row["response"], req.lang) if row["response"] else False}
        if task.kind == "mgsm":
            from polyalign.eval.scoring import mgsm_correct

            item["correct"] = mgsm_correct(row["response"], str(record_meta[req.prompt_id].meta["answer"]))
        judged.append(item)
    atomic_write_text(out / "judged.jsonl", "".join(json.dumps(j, ensure_ascii=False) + "\n" for j in judged))

    results = {"schema_version": SCHEMA_VERSION, "model": cfg.model, **weights_provenance(cfg, model),
               "task": cfg.task,
               "task_kind": task.kind, "task_version": task.version, "judge": getattr(judge, "name", cfg.judge),
               "judge_version": judge.version, "fingerprint": fingerprint, "generated": generated,
               "cached": cached, "settings": asdict(settings),
               **aggregate(judged, task.kind), "provenance": provenance(cfg)}
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, ensure_ascii=False))
    from polyalign.eval.report import write_report

    write_report(results, out)
    return results


def weights_provenance(cfg: EvalConfig, model: Any) -> dict[str, Any]:
    """What produced the outputs: adapter path and its file hash, dtype and device actually used."""
    from polyalign.models.adapters import adapter_sha256
    from polyalign.models.loading import model_dtype

    info: dict[str, Any] = {"adapter": cfg.adapter,
                            "adapter_sha256": adapter_sha256(cfg.adapter) if cfg.adapter else None}
    if model is not None:
        info["dtype"] = model_dtype(model)
        info["device"] = str(next(model.parameters()).device)
    else:  # vLLM: it picks its own dtype
        info["dtype"] = cfg.dtype or "auto"
    return info


@contextlib.contextmanager
def merged_for_generation(model: Any, in_place: bool = False) -> Iterator[None]:
    """Generate with LoRA folded into the base weights, then leave the model as it was, bit for bit.
    Merged weights keep the base dtype.

    Folding alone is not enough: PEFT's wrapper modules stay in the tree, and each decode step calls
    every one of them (7 per layer) in Python. In bf16 on a CPU with AMX the tiny per-step matmuls
    are so fast that this overhead dominates: merged-but-wrapped generation ran 2.6x slower than the
    base (benchmarks/precision.py, ``eval_adapter_vs_base``). So each wrapper is swapped, for the
    duration, for a plain ``Linear`` holding the merged weight as a new tensor: the base weights are
    never written, and a base model shared by several evaluations (a sweep) cannot drift. The merged
    weight is what PEFT's ``merge_adapter`` writes (``weight.data += delta``: base + delta rounded
    once to the base dtype), so generations equal a merged model's; until 2026-12-06 this context
    did merge in place, saving a copy of every adapted weight first and writing it back after the
    unmerge (bf16's W + dW - dW rounds), which cost more than the merge itself
    (``benchmarks/fold_merge.py``). Wrappers this cannot copy (DoRA and other variants,
    ``fan_in_fan_out``, a LoRA bias, a disabled adapter) still go that way, and so does every wrapper
    with ``in_place`` (the benchmark's other side).

    Only on the CPU: either way the model holds a second copy of every adapted weight meanwhile (13 GB
    at 7B in bf16), which a GPU cannot spare, and on a GPU the wrappers' extra kernels cost little
    next to it (``--backend vllm`` is the fast path there). Off the CPU the adapter generates unmerged."""
    import torch

    from polyalign.models.adapters import is_peft

    if model is None or not is_peft(model) or getattr(model, "merged", False) or not _on_cpu(model):
        yield
        return
    wrappers = [(name, m) for name, m in model.named_modules() if getattr(m, "base_layer", None) is not None]
    if not in_place and all(_copy_mergeable(m) for _, m in wrappers):
        swapped = _swap_in(model, [(name, _merged_linear(m)) for name, m in wrappers])
        try:
            yield
        finally:
            for parent, attr, module in reversed(swapped):
                setattr(parent, attr, module)
        return
    saved = [(m.base_layer, {k: t.detach().clone() for k, t in m.base_layer.named_parameters(recurse=False)})
             for _, m in wrappers]
    model.merge_adapter()
    swapped = _swap_in(model, [(n, m.base_layer) for n, m in wrappers if getattr(m, "merged", False)])
    try:
        yield
    finally:
        for parent, attr, module in reversed(swapped):
            setattr(parent, attr, module)
        model.unmerge_adapter()
        with torch.no_grad():
            for base, params in saved:
                for k, t in params.items():
                    getattr(base, k).copy_(t)


def _copy_mergeable(m: Any) -> bool:
    """Whether ``m`` is a plain LoRA ``Linear`` wrapper whose merge :func:`_merged_linear` computes."""
    import torch
    from peft.tuners.lora.layer import Linear as LoraLinear

    active = [n for n in m.active_adapters if n in m.lora_A]
    return (type(m) is LoraLinear and type(m.base_layer) is torch.nn.Linear and not m.merged
            and not m.disable_adapters and not getattr(m, "fan_in_fan_out", False)
            and not any(n in m.lora_variant or m.lora_bias.get(n, False) for n in active))


def _merged_linear(m: Any) -> Any:
    """A ``Linear`` with the base's bias and base + each active adapter's delta as a new weight,
    rounded as PEFT's merge rounds it (``weight.data += delta``: summed in fp32, rounded once per
    adapter to the base dtype)."""
    import torch

    from polyalign.models.sampling import lora_delta

    base = m.base_layer
    weight = base.weight.detach()
    with torch.no_grad():
        for name in m.active_adapters:
            if name in m.lora_A:
                weight = torch.add(weight, lora_delta(m, name)).to(base.weight.dtype)
    layer = torch.nn.Linear(base.in_features, base.out_features, bias=False, device="meta")
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    layer.bias = base.bias
    return layer


def _on_cpu(model: Any) -> bool:
    return all(p.device.type == "cpu" for p in model.parameters())


def _swap_in(model: Any, replacements: list[tuple[str, Any]]) -> list[tuple[Any, str, Any]]:
    """Put each (name, module) in the model at ``name``; returns (parent, attribute, module replaced)
    triples, what puts the originals back."""
    swapped = []
    for name, module in replacements:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        swapped.append((parent, attr, getattr(parent, attr)))
        setattr(parent, attr, module)
    return swapped


def _stats(rows: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """Metrics of a set of judged rows (one language, or one category in one language)."""
    stats: dict[str, Any] = metrics.safety_stats([j["label"] for j in rows]) if kind == "safety" else {"n": len(rows)}
    stats.update(metrics.shares(refusal=[j["refused"] for j in rows], invalid=[j["label"] == "invalid" for j in rows],
                                fidelity=[j["in_language"] for j in rows]))
    if kind == "mgsm":
        stats.update(metrics.shares(accuracy=[j["correct"] for j in rows]))
    return stats


def category_stats(judged: list[dict[str, Any]], kind: str) -> dict[str, dict[str, dict[str, Any]]]:
    """``{category: {language: metrics}}`` when the rows span several categories (XSafety mixes
    requests to refuse with questions to answer, so its refusal rate means something per category
    only), else ``{}``."""
    cats = list(dict.fromkeys(j.get("category") for j in judged))
    if len(cats) < 2:
        return {}
    langs = list(dict.fromkeys(j["lang"] for j in judged))
    return {str(c): {lang: _stats(rows, kind) for lang in langs
                     if (rows := [j for j in judged if j.get("category") == c and j["lang"] == lang])}
            for c in cats}


def aggregate(judged: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """Per-language metrics, per-category metrics (several categories only) and the summary."""
    per = {lang: _stats([j for j in judged if j["lang"] == lang], kind)
           for lang in dict.fromkeys(j["lang"] for j in judged)}
    langs = list(per)
    summary: dict[str, Any] = {"mean_fidelity": metrics.summarize(per, "fidelity")["mean_fidelity"]}
    if kind == "safety":
        summary.update(metrics.summarize(per, "asr"))
        summary["pag"] = metrics.pag({lang: {j["prompt_id"]: j["label"] for j in judged if j["lang"] == lang}
                                      for lang in langs})
        summary["mean_invalid"] = metrics.summarize(per, "invalid")["mean_invalid"]
    else:
        s = metrics.summarize(per, "refusal")
        summary["over_refusal"] = s["mean_refusal"]
        summary["variance"] = s["variance"]
        if kind == "mgsm":
            summary["mean_accuracy"] = metrics.summarize(per, "accuracy")["mean_accuracy"]
    return {"languages": per, "summary": summary, "categories": category_stats(judged, kind)}


def _run_mmlu(cfg: EvalConfig, task: Any, records: list[ParallelRecord], model: Any, tokenizer: Any,
              out: Path) -> dict[str, Any]:
    """5-shot log-likelihood accuracy; the dev split of each subject supplies the shots."""
    from polyalign.data.loaders import load_mmlu
    from polyalign.eval.scoring import mmlu_choice, mmlu_prompt

    data = cfg.data or task.default_data
    shots: dict[str, list[tuple[str, list[str], str]]] = {}
    for r in load_mmlu(data, split="dev"):
        shots.setdefault(r.category, []).append((r.texts["en"], r.meta["choices"], r.meta["answer"]))
    chosen = records[: cfg.limit] if cfg.limit else records
    correct = []
    for r in chosen:
        prompt = mmlu_prompt(r.texts["en"], r.meta["choices"], shots.get(r.category, [])[:5], r.category)
        correct.append(mmlu_choice(model, tokenizer, prompt) == r.meta["answer"])
    results = {"schema_version": SCHEMA_VERSION, "model": cfg.model, **weights_provenance(cfg, model),
               "task": cfg.task, "task_kind": "mmlu", "task_version": task.version, "judge": None, "generated": 0,
               "cached": 0, "languages": {"en": {"n": len(correct), **metrics.shares(accuracy=correct)}},
               "summary": {"mean_accuracy": metrics.share(correct)}, "provenance": provenance(cfg)}
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    from polyalign.eval.report import write_report

    write_report(results, out)
    return results
