"""Every generation setting of generation (training-time sampling and evaluation), explicit.

``model.generate`` merges three layers: the arguments given, then the model's own
``generation_config`` (``generation_config.json`` of the checkpoint: Qwen ships
``repetition_penalty=1.05``, ``top_k=20``, ...), then library defaults (``top_k=50``). Overriding
temperature and top_p alone therefore samples y from a distribution nobody asked for: a repetition
penalty also penalises the query's own tokens. MSD's y must come from ``q`` as configured
(METHODS.md section 2) and evaluation must be the greedy decoding it claims, so every setting that changes the next-token distribution or the stopping
rule is passed here, with its neutral value unless the config asks otherwise.

They go in as keyword arguments, not as a ``GenerationConfig`` object: transformers (5.x) fills any
``None`` field of a passed config from the model's config, so "off" (``None``) could not be
expressed that way; keyword arguments are applied last and win, ``None`` included.
"""

from __future__ import annotations

from typing import Any


def sampling_kwargs(max_new_tokens: int, temperature: float, top_p: float = 1.0, pad_token_id: int | None = None,
                    eos_token_ids: list[int] | None = None, top_k: int | None = None,
                    repetition_penalty: float = 1.0) -> dict[str, Any]:
    """``generate`` keyword arguments for plain ancestral sampling (``temperature == 0``: greedy).

    Args:
        max_new_tokens: length cap of y.
        temperature: softmax temperature; 0 decodes greedily.
        top_p: nucleus mass (1.0 = off).
        pad_token_id, eos_token_ids: padding and the tokens that end y (None: the model's EOS).
        top_k: sampling only; None = the whole vocabulary.
        repetition_penalty: 1.0 (none) unless asked for.
    """
    greedy = temperature == 0
    return {
        # what y is drawn from
        "do_sample": not greedy, "num_beams": 1, "temperature": None if greedy else temperature,
        "top_p": None if greedy else top_p, "top_k": None if greedy else top_k, "min_p": None, "top_h": None, "typical_p": None,
        "epsilon_cutoff": None, "eta_cutoff": None,
        # no penalties, biases or forced / suppressed tokens
        "repetition_penalty": repetition_penalty, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
        "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "sequence_bias": None,
        "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
        "forced_eos_token_id": None, "exponential_decay_length_penalty": None, "guidance_scale": None,
        "watermarking_config": None, "renormalize_logits": False, "remove_invalid_values": False,
        # when y stops
        "max_new_tokens": max_new_tokens, "min_new_tokens": None, "min_length": 0, "max_length": None,
        "max_time": None, "stop_strings": None, "pad_token_id": pad_token_id,
        **({"eos_token_id": eos_token_ids} if eos_token_ids is not None else {}),
        # one sequence per prompt, with the KV cache
        "num_return_sequences": 1, "use_cache": True,
    }
