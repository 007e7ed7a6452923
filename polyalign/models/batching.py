"""Tensor plumbing shared by the trainers: right-aligned (left-padded) batches.

Left padding puts every sequence's last token at the same index, so the response window of
student and teacher (same response tokens, different prompts) is the last R positions of both
batches, and ``logits_to_keep=R + 1`` computes the LM head only there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids, attention_mask, position_ids), each [B, T]; positions count real tokens only,
    so a padded row computes exactly what the unpadded sequence would."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, T - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, mask, pos


def response_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict[str, Tensor]:
    """prompt + response, left-padded, plus ``response_mask`` [B, R] over the last R positions
    (R = longest response), True where row b has a response token."""
    ids, mask, pos = left_pad([p + r for p, r in zip(prompts, responses)], pad_id)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "response_mask": response_mask(responses)}


def response_mask(responses: list[list[int]]) -> Tensor:
    """[B, R] (R = longest response, at least 1), True over row b's last |y_b| positions."""
    R = max(1, max(len(r) for r in responses))
    mask = torch.zeros((len(responses), R), dtype=torch.bool)
    for i, r in enumerate(responses):
        if r:
            mask[i, R - len(r):] = True
    return mask


def response_logits(model, batch: dict[str, Tensor]) -> Tensor:
    """Logits predicting each response token: [B, R, V] (the position before each token)."""
    R = batch["response_mask"].shape[1]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=R + 1, use_cache=False)
    return out.logits[:, :-1]


def _decoder(model: Any) -> Any:
    """The transformer body under any wrapper (DDP's ``module``, PEFT, a causal-LM head)."""
    while hasattr(model, "module") and not hasattr(model, "get_decoder"):
        model = model.module                                    # DDP / DeepSpeed engine
    return model.get_decoder()


def final_hidden_forward(model, cache: Any = None, **inputs: Any) -> tuple[Any, Tensor]:
    """(the model's output, its final post-norm hidden states [B, T, H]) from one normal forward.

    The body's output is caught by a forward hook rather than asked for with ``output_hidden_states``,
    which would hold every layer's states until the forward returns (under ``no_grad`` nothing else
    keeps them: ~1 GB at 7B, 28 layers x batch 8 x 600 tokens; issue #24). The normal forward runs so
    DDP / DeepSpeed wrappers see one. ``cache``: keys and values of earlier positions to attend to
    (:func:`prefixed_response_hidden`), extended in place."""
    caught: list[Tensor] = []
    hook = _decoder(model).register_forward_hook(
        lambda _m, _a, out: caught.append(out[0] if isinstance(out, tuple) else out.last_hidden_state))
    try:
        out = (model(**inputs, use_cache=False) if cache is None
               else model(**inputs, use_cache=True, **{cache_kwarg(): cache}))
    finally:
        hook.remove()
    return out, caught[-1]


def response_hidden(model, batch: dict[str, Tensor], head, shared: HeadKV | None = None) -> Tensor:
    """Final hidden states before each response token, [B, R, H]: ``head`` of them is :func:`response_logits`.

    The model runs its normal forward (:func:`final_hidden_forward`); the last hidden state is
    post-norm, what the LM head consumes. The head itself runs at one position only
    (``logits_to_keep=1``), whose logits check that ``head`` alone reproduces the model's: a model
    that post-processes logits (soft-capping, scaling) raises instead of training on the wrong ones.
    ``shared``: the rows' common first tokens, already run (:func:`shared_head_kv`); ``batch`` holds
    what follows them.
    """
    R = batch["response_mask"].shape[1]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    cache = None
    if shared is not None:
        inputs, cache = after_shared_head(shared, **inputs)
    out, h = final_hidden_forward(model, cache=cache, logits_to_keep=1, **inputs)         # h: [B, T, H]
    _check_head(out, h, head)
    return h[:, -(R + 1):-1]


def _check_head(out: Any, h: Tensor, head) -> None:
    """Raise unless ``head`` of the last position's hidden state gives the model's own logits there."""
    with torch.no_grad():
        want, got = out.logits[:, -1].float(), head(h[:, -1]).float()       # [B, V]
        if not (got - want).abs().max() <= 1e-2 * want.abs().max() + 1e-4:
            raise ValueError("the LM head alone does not reproduce the model's logits (soft-capping or scaling?): "
                             "set msd.fused_lm_head: false")


def trim_generation(new_tokens: Tensor, eos_ids: set[int], pad_id: int) -> list[list[int]]:
    """Generated ids [B, N] -> per row, the tokens up to and including the first EOS."""
    out = []
    for row in new_tokens.tolist():
        keep = []
        for t in row:
            keep.append(t)
            if t in eos_ids:
                break
        while keep and keep[-1] == pad_id and pad_id not in eos_ids:
            keep.pop()
        out.append(keep)
    return out


def last_token_hidden(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """[B, T, H] -> [B, H] at the last non-padding token (works for left or right padding)."""
    T = attention_mask.shape[1]
    idx = T - 1 - attention_mask.flip(-1).long().argmax(-1)   # index of the last 1 in each row
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]


def length_buckets(lengths: list[int], overhead: int = 32) -> list[list[int]]:
    """Split rows into groups run as separate forwards so that padding is not computed.

    Cost of a group = rows x longest length + ``overhead`` (per-call cost in token units). Rows are
    sorted by length and cut where it minimises the total (exact dynamic programme over the sorted
    order, O(N^2) for N rows). One long language (Bengali in Qwen's tokenizer can be 5x English)
    otherwise makes every other variant pay its length in padding.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n            # best[j]: cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):                        # last group = sorted rows i..j-1
            cost = best[i] + (j - i) * lengths[order[j - 1]] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def packed_response_hidden(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int, head,
                           device: torch.device | str, overhead: int = 16, share_head: bool = True) -> Tensor:
    """:func:`response_hidden` of every row's real response positions only, packed: [sum_i |y_i|, H],
    row by row, each row's positions in order (the order of ``response_mask``'s True entries).

    Why: one left-padded batch computes every row at the longest prompt + response of the batch.
    The demo's batches mix nine languages whose prompts differ several-fold in length, and the
    teacher's (English template + query) are longer still, so most of a padded forward can be
    padding. Rows run here in :func:`length_buckets` groups, each its own forward; positions count
    real tokens only (:func:`left_pad`), so every row computes what it would alone, and the packed
    output feeds the fused head only at the positions the loss reads. Works with or without grad
    (each group's forward stays in the graph). ``share_head``: the tokens every prompt starts with run
    once (:func:`shared_head_length`).
    """
    n = shared_head_length(prompts) if share_head and any(responses) and can_share_head(model) else 0
    shared = shared_head_kv(model, prompts[0][:n], device) if n else None
    lengths = [len(p) - n + len(r) for p, r in zip(prompts, responses, strict=True)]
    rows: list[Tensor | None] = [None] * len(prompts)
    for group in length_buckets(lengths, overhead):
        if not any(responses[i] for i in group):
            continue
        batch = {k: v.to(device) for k, v in
                 response_batch([prompts[i][n:] for i in group], [responses[i] for i in group], pad_id).items()}
        h = response_hidden(model, batch, head, shared)                        # [g, R_g, H]
        for j, i in enumerate(group):
            rows[i] = h[j, batch["response_mask"][j]]                          # [|y_i|, H]
    kept = [r for r in rows if r is not None]
    if not kept:            # no response token in the batch: an empty [0, H] that is still in the graph
        batch = {k: v.to(device) for k, v in response_batch(prompts[:1], [[]], pad_id).items()}
        return response_hidden(model, batch, head)[0, :0]
    return torch.cat(kept)


# --- The prompts' shared head computed once (issue #26) ---------------------------------------------
# A chat template starts every prompt with the same tokens: Qwen2.5's default system turn and the
# user turn's opening are 24 of the demo's ~67 prompt tokens. Under causal attention those tokens'
# keys and values are the same in every row (same tokens at positions 0..P-1), so one row computes
# them and every row attends to that copy: each row's own tokens follow as [head][padding][own],
# the mask hiding the padding and positions continuing at P. Same values up to float rounding; with
# grad on, the head's forward is in the graph once and its gradient sums over the rows.

HeadKV = list[tuple[Tensor, Tensor]]      # per layer (K, V), each [1, heads, P, d]


def share_head_enabled() -> bool:
    """Whether forwards and ``generate`` run the prompts' shared head once, unless
    ``POLYALIGN_SHARE_HEAD=0`` (the switch that measures it)."""
    import os

    return os.environ.get("POLYALIGN_SHARE_HEAD", "1") != "0"


# A head shorter than this is not worth a forward call of its own.
SHARED_HEAD_MIN_TOKENS = 8


def shared_head_length(seqs: list[list[int]], keep: int = 1, minimum: int | None = None) -> int:
    """Tokens every sequence starts with, leaving each at least ``keep`` of its own; 0 (nothing to
    share) for fewer than two sequences, a head under ``minimum`` tokens (default
    :data:`SHARED_HEAD_MIN_TOKENS`) or ``POLYALIGN_SHARE_HEAD=0``."""
    minimum = SHARED_HEAD_MIN_TOKENS if minimum is None else minimum
    if len(seqs) < 2 or not share_head_enabled():
        return 0
    limit, first = min(len(s) for s in seqs) - keep, seqs[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in seqs):
        n += 1
    return n if n >= minimum else 0


def shared_head_kv(model, head_ids: list[int], device: torch.device | str) -> HeadKV:
    """Keys and values of ``head_ids`` run alone, one row; in the graph when grad is on."""
    from transformers import DynamicCache

    cache = DynamicCache()
    n = len(head_ids)
    model(input_ids=torch.tensor([head_ids], device=device), attention_mask=torch.ones((1, n), dtype=torch.long,
          device=device), position_ids=torch.arange(n, device=device)[None], logits_to_keep=1, use_cache=True,
          **{cache_kwarg(): cache})
    if not cache.layers or cache.layers[0].keys is None or cache.layers[0].keys.shape[2] != n:
        raise RuntimeError("the model's forward filled no KV cache (gradient checkpointing?): "
                           "the prompts' shared head cannot be kept")
    return [(layer.keys, layer.values) for layer in cache.layers]


def after_shared_head(shared: HeadKV, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                      ) -> tuple[dict[str, Tensor], Any]:
    """(forward inputs, cache) for left-padded rows that follow ``shared``: the mask gains the head's
    columns, positions start after it, and the cache holds the head once per row."""
    rows, n = input_ids.shape[0], shared[0][0].shape[2]
    mask = torch.cat([attention_mask.new_ones(rows, n), attention_mask], dim=1)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids + n}, shared_head_cache(shared, rows)


def shared_head_cache(shared: HeadKV, rows: int) -> Any:
    """A ``DynamicCache`` holding the shared head once per row (expanded views, not copies)."""
    from transformers import DynamicCache

    return DynamicCache([(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in shared])


# --- The student's prompt computed once per step (issue #26) -------------------------------------
# On-policy MSD ran the student's prompt twice with the same weights: once as ``generate``'s prefill
# (no grad) and once inside the training forward (with grad). Here the training forward's prompt pass
# comes first, in length groups, and keeps each row's keys and values (in the graph); sampling
# decodes from a detached copy of them, and the training forward then runs the response tokens only,
# attending to the kept keys and values, so the gradient still reaches the prompt positions.


def cache_kwarg() -> str:
    """The name ``forward`` / ``generate`` take a KV cache by: ``cache`` from transformers 5.2x,
    ``past_key_values`` before (still accepted, deprecated, until 6.0)."""
    import transformers.generation.utils as gen

    return "cache" if "cache" in getattr(gen, "ALL_CACHE_NAMES", ()) else "past_key_values"


def shares_prefill(model: Any) -> bool:
    """Whether a model's prompt pass can serve both sampling and training: no active dropout (the
    training pass runs in train mode, sampling in eval mode), only full-attention layers (the
    merged cache is one plain ``DynamicLayer`` per layer) and no gradient checkpointing (which
    switches the training forward's cache off)."""
    checkpointing = getattr(model, "is_activation_checkpointing", None)     # transformers >= 5.2x
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing:
        return False
    config = getattr(model, "config", None)
    if config is None or getattr(config, "attention_dropout", 0.0) not in (0, 0.0):
        return False
    if not full_attention_only(model):
        return False
    return not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def full_attention_only(model: Any) -> bool:
    """Whether every layer attends to all earlier positions (no sliding window, chunked or linear
    attention), so that a plain ``DynamicCache`` of keys and values is what each layer reads."""
    config = getattr(model, "config", None)
    if config is None:
        return False
    types = getattr(config, "layer_types", None)
    if types:
        return all(t == "full_attention" for t in types)
    return getattr(config, "sliding_window", None) is None     # Mistral: a window and no layer_types


def can_share_head(model: Any) -> bool:
    """Whether ``model``'s forward can attend to a shared head computed apart: in training, as
    :func:`shares_prefill` (a filled KV cache, no dropout mask for rows to share); in eval mode, full
    attention only."""
    return shares_prefill(model) if model.training else full_attention_only(model)


Prefix = list[tuple[Tensor, Tensor]]      # one row: per layer (K, V), each [1, heads, P - 1, d]


def prompt_prefix(model, prompts: list[list[int]], pad_id: int, device: torch.device | str,
                  overhead: int = 16, share_head: bool = True) -> list[Prefix]:
    """Per row, the keys and values of its prompt without the last token, from :func:`length_buckets`
    groups of one forward each; in the graph when grad is on. (The last prompt token is left out:
    its hidden state predicts the first response token, so :func:`prefixed_response_hidden` runs it,
    and ``generate`` needs one uncached token to start from.) ``share_head``: the tokens every prompt
    starts with run once (:func:`shared_head_length`)."""
    from transformers import DynamicCache

    if any(len(p) < 2 for p in prompts):
        raise ValueError("prompt_prefix needs prompts of at least 2 tokens")
    seqs = [p[:-1] for p in prompts]
    n = shared_head_length(seqs) if share_head and can_share_head(model) else 0
    shared = shared_head_kv(model, seqs[0][:n], device) if n else None
    heads: list[Prefix | None] = [None] * len(prompts)
    for group in length_buckets([len(s) - n for s in seqs], overhead):
        ids, mask, pos = left_pad([seqs[i][n:] for i in group], pad_id)
        inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": pos.to(device)}
        cache = DynamicCache()
        if shared is not None:
            inputs, cache = after_shared_head(shared, **inputs)
        model(**inputs, logits_to_keep=1, use_cache=True, **{cache_kwarg(): cache})
        if not cache.layers or cache.layers[0].keys is None or cache.layers[0].keys.shape[2] != n + ids.shape[1]:
            raise RuntimeError("the model's forward filled no KV cache (gradient checkpointing?): "
                               "prompt_prefix cannot keep the prompt's keys and values")
        for j, i in enumerate(group):
            heads[i] = [(_unpadded_row(layer.keys, j, n, len(seqs[i]) - n), _unpadded_row(layer.values, j, n,
                         len(seqs[i]) - n)) for layer in cache.layers]
    return heads  # type: ignore[return-value]


def _unpadded_row(t: Tensor, j: int, head: int, own: int) -> Tensor:
    """Row ``j`` of cached keys or values laid out [head][padding][own]: the head's columns, then its own."""
    if not head:
        return t[j:j + 1, :, -own:]
    return torch.cat([t[j:j + 1, :, :head], t[j:j + 1, :, -own:]], dim=2)


def merged_prefix_cache(prefix: list[Prefix], rows: list[int], detach: bool = False) -> tuple[Any, int]:
    """(a ``DynamicCache`` holding ``rows``' prefixes left-padded with zeros to the longest, its length):
    what a left-padded batch of those rows' prompts would have cached (the attention mask hides the
    zeros)."""
    from transformers import DynamicCache

    length = max(prefix[i][0][0].shape[2] for i in rows)

    def stacked(layer: int, kv: int) -> Tensor:
        parts = []
        for i in rows:
            t = prefix[i][layer][kv]
            t = t.detach() if detach else t
            if t.shape[2] < length:
                t = torch.cat([t.new_zeros(*t.shape[:2], length - t.shape[2], t.shape[3]), t], dim=2)
            parts.append(t)
        return torch.cat(parts)

    layers = range(len(prefix[rows[0]]))
    return DynamicCache([(stacked(ly, 0), stacked(ly, 1)) for ly in layers]), length


def prefixed_response_hidden(model, prefix: list[Prefix], prompts: list[list[int]], responses: list[list[int]],
                             head, device: torch.device | str, overhead: int = 16) -> Tensor:
    """:func:`packed_response_hidden` from kept prompt prefixes: per row, the forward runs only the last
    prompt token and the response (all but its last token), attending to the row's prefix, in groups
    of similar response length. Same values up to float rounding; the gradient reaches the prefix's
    forward through the cached keys and values. [sum_i |y_i|, H], row by row."""
    rows: list[Tensor | None] = [None] * len(prompts)
    live = [i for i, r in enumerate(responses) if r]
    check = None
    for g in length_buckets([len(responses[i]) for i in live], overhead):
        group = [live[k] for k in g]
        cache, past = merged_prefix_cache(prefix, group)
        width = max(len(responses[i]) for i in group)
        ids = torch.zeros((len(group), width), dtype=torch.long)
        mask = torch.ones((len(group), past + width), dtype=torch.long)
        pos = torch.zeros((len(group), width), dtype=torch.long)
        for j, i in enumerate(group):
            seq = [prompts[i][-1], *responses[i][:-1]]
            ids[j, :len(seq)] = torch.tensor(seq)
            mask[j, :past - (len(prompts[i]) - 1)] = 0                        # the prefix's left padding
            pos[j] = len(prompts[i]) - 1 + torch.arange(width)
        out, h = final_hidden_forward(model, input_ids=ids.to(device), attention_mask=mask.to(device),
                                      position_ids=pos.to(device), logits_to_keep=1, cache=cache)
        check = check or (out, h)
        for j, i in enumerate(group):
            rows[i] = h[j, :len(responses[i])]                                 # [|y_i|, H]
    if check is not None:
        _check_head(*check, head)
    kept = [r for r in rows if r is not None]
    if not kept:            # no response token in the batch: an empty [0, H] that is still in the graph
        return prefix[0][0][0].new_zeros(0, head.weight.shape[1]) + 0 * prefix[0][0][0].sum()
    return torch.cat(kept)
