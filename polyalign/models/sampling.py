"""Generation with exactly the settings asked for.

``model.generate`` fills every setting left at transformers' global default from the model's own
``generation_config``: Qwen2.5 ships ``repetition_penalty=1.05``, ``top_k=20``, ``top_p=0.8``,
``temperature=0.7``. A penalty also penalises the query's own tokens, so an evaluation that asks for
greedy decoding, or an on-policy sample that asks for temperature 1, silently gets something else.
:func:`explicit_generation` swaps in a config holding only the special-token ids for the duration of
the call, and :func:`sampling_kwargs` spells out every setting that changes which tokens are drawn.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def explicit_generation(model: Any) -> Iterator[Any]:
    """Within the block, ``model.generate`` sees no sampling defaults but the special-token ids."""
    from transformers import GenerationConfig

    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    old = target.generation_config
    keep = {k: getattr(old, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id",
                                                "decoder_start_token_id")}
    target.generation_config = GenerationConfig(**{k: v for k, v in keep.items() if v is not None})
    try:
        yield model
    finally:
        target.generation_config = old


def sampling_kwargs(max_new_tokens: int, do_sample: bool, temperature: float = 1.0, top_p: float = 1.0,
                    top_k: int | None = None, repetition_penalty: float = 1.0, pad_token_id: int | None = None,
                    eos_token_id: int | list[int] | None = None) -> dict[str, Any]:
    """Every ``generate`` argument that decides which tokens come out, stated explicitly.

    Greedy (``do_sample=False``) ignores temperature/top-p/top-k; sampling uses exactly the given
    ones (top_k ``None`` = the whole vocabulary). ``repetition_penalty`` is 1.0 (none) unless asked.
    """
    kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "use_cache": True,
                          "repetition_penalty": repetition_penalty, "no_repeat_ngram_size": 0,
                          "pad_token_id": pad_token_id}
    if do_sample:
        kw.update(temperature=temperature, top_p=top_p, top_k=top_k)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    if eos_token_id is not None:
        kw["eos_token_id"] = eos_token_id
    return kw
