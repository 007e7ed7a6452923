"""Greedy decoding that stops computing a row once it has ended (issue #26).

``generate`` keeps every row of a batch in every decode step until the last one ends: a row that
ended at token 5 of 40 is fed padding, and its attention, MLP and 151,936-wide LM head are computed
35 more times. On a CPU a batch of 128 rows decodes compute-bound (0.5B: ~1 GFLOP a row and
token against 2 GB of weights read once per step), so those rows cost their full share: in the demo's
evaluation of the trained adapter 29 % of the decoded row-steps came after the row's end, and MGSM's
384-token answers end anywhere. Here a row leaves the batch (and the KV cache,
``DynamicCache.batch_select_indices``) at its EOS; the other rows' tokens are the greedy argmax
``generate`` takes, over the same logits up to the float rounding of a smaller batch.

Greedy only, and only where every layer is full attention (:func:`full_attention_only`): sampling
would draw from the random stream in another order, and a sliding-window or recurrent cache is not
a plain batch of keys and values. ``POLYALIGN_COMPACT_DECODE=0`` turns it off (the switch
``benchmarks/eval_batch_size.py --compact`` measures it with).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from polyalign.models.batching import cache_kwarg, full_attention_only


def compact_decode_enabled() -> bool:
    """Whether greedy evaluation drops ended rows, unless ``POLYALIGN_COMPACT_DECODE=0``."""
    return os.environ.get("POLYALIGN_COMPACT_DECODE", "1") != "0"


def can_compact(model: Any) -> bool:
    """A Hugging Face causal LM (under PEFT or not) whose every layer is full attention; anything else
    (a wrapper with its own ``generate``) keeps ``generate``."""
    from transformers import PreTrainedModel

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return compact_decode_enabled() and isinstance(base, PreTrainedModel) and full_attention_only(model)


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """The ids that end a response: the model's ``generation_config`` (what ``generate`` stops at;
    Qwen2.5-Instruct: ``<|im_end|>`` and ``<|endoftext|>``), else the tokenizer's EOS."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = {eos} if isinstance(eos, int) else set(eos or [])
    if not ids:
        raise ValueError("the model has no EOS token id: set generation_config.eos_token_id")
    return ids


@torch.no_grad()
def greedy_decode(model: Any, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                  max_new_tokens: int, eos_ids: set[int], cache: Any = None) -> list[list[int]]:
    """Greedy continuations of left-padded rows, each up to and including its EOS (or
    ``max_new_tokens`` long); a row leaves the batch once it has ended.

    ``cache``: keys and values of positions before ``input_ids`` (a shared head,
    :func:`polyalign.models.batching.after_shared_head`; ``attention_mask`` then covers them too),
    or None."""
    from transformers import DynamicCache

    device = input_ids.device
    cache = DynamicCache() if cache is None else cache
    ends = torch.tensor(sorted(eos_ids), device=device)
    out: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    rows = torch.arange(input_ids.shape[0], device=device)        # the batch's rows, as indices of out
    ids, mask, pos = input_ids, attention_mask, position_ids
    for step in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                       **{cache_kwarg(): cache}).logits[:, -1]
        nxt = logits.float().argmax(dim=-1)                        # generate's greedy choice, in fp32
        for r, t in zip(rows.tolist(), nxt.tolist()):
            out[r].append(t)
        ended = torch.isin(nxt, ends)
        if step == max_new_tokens - 1 or bool(ended.all()):
            break
        if bool(ended.any()):                                      # drop ended rows everywhere
            keep = (~ended).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, nxt, mask, pos = rows[keep], nxt[keep], mask[keep], pos[keep]
        ids = nxt[:, None]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        pos = pos[:, -1:] + 1
    return out


@torch.no_grad()
def greedy_ids(model: Any, prompts: list[list[int]], max_new_tokens: int, eos_ids: set[int],
               pad_id: int) -> list[list[int]]:
    """Greedy continuations of token-id prompts, each up to and including its EOS: the prompts' common
    head (a chat template's system turn) prefilled once (:func:`polyalign.models.batching.shared_head_kv`),
    the rest left-padded after it, and a row leaving the batch at its EOS (:func:`greedy_decode`).
    The caller checks :func:`can_compact`; ``model`` is in eval mode."""
    from polyalign.models.batching import (
        after_shared_head,
        can_share_head,
        left_pad,
        shared_head_kv,
        shared_head_length,
    )

    device = next(model.parameters()).device
    n = shared_head_length(prompts) if can_share_head(model) else 0
    ids, mask, pos = left_pad([p[n:] for p in prompts], pad_id)
    inputs, cache = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}, None
    if n:
        inputs, cache = after_shared_head(shared_head_kv(model, prompts[0][:n], device), **inputs)
    return greedy_decode(model, **{k: v.to(device) for k, v in inputs.items()}, max_new_tokens=max_new_tokens,
                         eos_ids=eos_ids, cache=cache)
