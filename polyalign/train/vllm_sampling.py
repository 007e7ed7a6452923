"""On-policy sampling for MSD with vLLM, and the settings that keep HF sampling correct under sharding.

Sampling y is most of an MSD step; vLLM does it several times faster than HF ``generate``. The engine
is TRL's own integration (``trl.generation.vllm_generation.VLLMGeneration``, what GRPOTrainer uses):
``colocate`` runs a ``vllm.LLM`` in each training process, ``server`` talks to ``trl vllm-serve``
through ``VLLMClient``; its ``sync_weights`` pushes the policy (LoRA merged into the base, ZeRO-3 and
FSDP shards gathered) into the engine. What is ours is the schedule (:class:`StepSampler`): as TRL's
GRPO, one generation per optimizer step for all of its gradient-accumulation micro-batches, the
weights pushed once per step before it. vLLM is imported lazily: it is a CUDA-only extra.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections import deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from polyalign.errors import PolyalignError

if TYPE_CHECKING:
    from polyalign.train.msd_config import MSDConfig

VLLM_MISSING = ("msd.use_vllm needs vLLM, which is not installed: pip install 'polyalign[vllm]' (Linux + CUDA), "
                "or set msd.use_vllm=false")


def require_vllm() -> None:
    """One line naming what to install when vLLM is absent (checked without importing it: importing
    vLLM initialises CUDA, which must wait for the trainer's own set-up)."""
    if importlib.util.find_spec("vllm") is None:
        raise PolyalignError(VLLM_MISSING)


def engine_options(cfg: MSDConfig, eos_ids: Iterable[int]) -> dict[str, Any]:
    """``VLLMGeneration`` keyword arguments: the engine of ``cfg.vllm_*`` and exactly the sampling of
    the HF path (:func:`polyalign.models.sampling.sampling_kwargs`): temperature and top_p as configured,
    no top-k / min-p / repetition penalty (explicit, so neither the checkpoint's generation_config nor
    the server's defaults apply), ``max_new_tokens``, stopping at every EOS id. Logprobs are not needed."""
    return {
        "mode": cfg.vllm_mode,
        "server_base_url": cfg.vllm_server_base_url, "server_host": cfg.vllm_server_host,
        "server_port": cfg.vllm_server_port, "server_timeout": cfg.vllm_server_timeout,
        "tensor_parallel_size": cfg.vllm_tensor_parallel_size,
        "gpu_memory_utilization": cfg.vllm_gpu_memory_utilization,
        "max_model_length": cfg.max_prompt_tokens + cfg.max_new_tokens,   # a smaller KV cache than the model's
        "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
        "max_completion_length": cfg.max_new_tokens, "logprobs": None,
        "generation_kwargs": {"stop_token_ids": sorted(eos_ids)},
    }


def build_engine(model: Any, accelerator: Any, tokenizer: Any, cfg: MSDConfig, eos_ids: Iterable[int]) -> Any:
    """TRL's ``VLLMGeneration`` for ``model`` (colocate: built here, on every rank; server: rank 0
    connects). A collective: every rank calls it."""
    require_vllm()
    from trl.generation.vllm_generation import VLLMGeneration

    try:
        return VLLMGeneration(model=model, accelerator=accelerator, processing_class=tokenizer,
                              **engine_options(cfg, eos_ids))
    except ImportError as err:                  # vLLM present but not a version TRL can use
        raise PolyalignError(f"msd.use_vllm: {err}") from None


def trim_at_eos(ids: Iterable[int], eos_ids: set[int]) -> list[int]:
    """The tokens up to and including the first EOS (as the HF path's ``trim_generation``)."""
    out = []
    for t in ids:
        out.append(int(t))
        if t in eos_ids:
            break
    return out


class StepSampler:
    """Samples every micro-batch of an optimizer step in one engine call.

    ``plan`` gets the prompts of the step's micro-batches before the first one runs (Trainer fetches
    them up front); the first ``sample`` generates for all of them and later calls get their slice.
    A call whose prompts are not the next planned micro-batch (evaluation, a direct call) gets a
    generation of its own. On-policy (``push_weights``), the engine gets the current weights once per
    step, before that step's first generation; off-policy the engine keeps the weights it was built
    with, the frozen teacher's. The engine's seed is ``seed + step``: reproducible, new every step.
    """

    def __init__(self, engine: Any, push_weights: bool, seed: int, eos_ids: set[int]):
        self.engine, self.push_weights, self.seed, self.eos_ids = engine, push_weights, seed, set(eos_ids)
        self.pushed_step: int | None = None
        self._planned: list[list[list[int]]] = []
        self._ready: deque[tuple[list[list[int]], list[list[int]]]] = deque()

    def plan(self, micro_batches: list[list[list[int]]]) -> None:
        """The prompts (token ids) of each micro-batch of the coming optimizer step, in order."""
        self._planned, self._ready = [list(b) for b in micro_batches], deque()

    def sample(self, prompts: list[list[int]], step: int) -> list[list[int]]:
        if self._planned:                                   # the step's first micro-batch: generate for all
            groups, self._planned = self._planned, []
            flat = iter(self._generate([p for g in groups for p in g], step))
            self._ready = deque((g, [next(flat) for _ in g]) for g in groups)
        if self._ready and self._ready[0][0] == prompts:
            return self._ready.popleft()[1]
        return self._generate(prompts, step)

    def _generate(self, prompts: list[list[int]], step: int) -> list[list[int]]:
        if self.push_weights and self.pushed_step != step:
            self.engine.sync_weights()
            self.pushed_step = step
        self.engine.generation_kwargs["seed"] = self.seed + step
        _, completions, _, _ = self.engine.generate(prompts=prompts, images=None, num_generations=1)
        return [trim_at_eos(c, self.eos_ids) for c in completions]


def sharded(accelerator: Any) -> tuple[bool, int | None]:
    """(DeepSpeed ZeRO-3 on, FSDP version or None), as TRL's ``DistributedBackend`` reads them."""
    from trl.distributed import DistributedBackend

    backend = DistributedBackend(accelerator)
    return backend.is_zero3, backend.fsdp_version


def hf_generation_kwargs(accelerator: Any) -> dict[str, Any]:
    """``synced_gpus=True`` when parameters are sharded (ZeRO-3, FSDP) across processes: each forward
    is a collective, so a rank whose sequences all ended must keep stepping until every rank is done
    (else the others hang). Empty otherwise."""
    zero3, fsdp = sharded(accelerator)
    return {"synced_gpus": True} if (zero3 or fsdp is not None) and accelerator.num_processes > 1 else {}


@contextlib.contextmanager
def full_root_params(module: Any, accelerator: Any) -> Iterator[None]:
    """FSDP1: the root unit's own parameters (embeddings, final norm, LM head), which the unwrapped
    model's forward would otherwise see sharded (TRL's ``summon_full_params(model, recurse=False)``, as
    its trainers generate); the wrapped layers gather their own in forward. A no-op otherwise."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from trl.distributed import DistributedBackend

    if isinstance(module, FSDP):
        with DistributedBackend(accelerator).summon_full_params(module, recurse=False, writeback=False):
            yield
    else:
        yield
