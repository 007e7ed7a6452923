"""Render prompts with the model's own chat template (METHODS.md: a "prompt" is the user turn
rendered with ``add_generation_prompt=True``)."""

from __future__ import annotations

from typing import Any


def _messages(user_text: str, system: str | None, fold_system: bool) -> list[dict[str, str]]:
    if not system:
        return [{"role": "user", "content": user_text}]
    if fold_system:
        return [{"role": "user", "content": f"{system}\n\n{user_text}"}]
    return [{"role": "system", "content": system}, {"role": "user", "content": user_text}]


def render_prompt(tokenizer: Any, user_text: str, system: str | None = None) -> str:
    """The chat-template text for one user turn, ending where the assistant starts to speak.

    A template without a system role (Gemma's raises "System role not supported") gets the system
    text at the start of the user turn instead, as TRL and the model cards do."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(_messages(user_text, system, False), tokenize=False,
                                             add_generation_prompt=True)
    except TemplateError:
        if not system:
            raise
    return tokenizer.apply_chat_template(_messages(user_text, system, True), tokenize=False,
                                         add_generation_prompt=True)


def prompt_ids(tokenizer: Any, user_text: str, system: str | None = None, max_tokens: int | None = None) -> list[int]:
    """Token ids of :func:`render_prompt` (the template already holds any special tokens).

    ``max_tokens``: a longer prompt loses the start of its *user text*, so BOS, the system turn and
    the role headers stay whole (cutting the rendered ids from the left dropped exactly those)."""
    ids = _ids(tokenizer, render_prompt(tokenizer, user_text, system))
    if max_tokens is None or len(ids) <= max_tokens:
        return ids
    enc = tokenizer(user_text, add_special_tokens=False, return_offsets_mapping=True)
    starts = [start for start, _ in enc["offset_mapping"]]
    keep = len(starts) - (len(ids) - max_tokens)
    while keep > 0:               # merges at the cut can change the count by a token or two: retry shorter
        ids = _ids(tokenizer, render_prompt(tokenizer, user_text[starts[len(starts) - keep]:], system))
        if len(ids) <= max_tokens:
            return ids
        keep -= len(ids) - max_tokens
    return _ids(tokenizer, render_prompt(tokenizer, "", system))      # the template alone is over the limit


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]
