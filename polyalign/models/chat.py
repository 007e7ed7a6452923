"""Render prompts with the model's own chat template (METHODS.md: a "prompt" is the user turn
rendered with ``add_generation_prompt=True``)."""

from __future__ import annotations

from typing import Any


def render_prompt(tokenizer: Any, user_text: str, system: str | None = None) -> str:
    """The chat-template text for one user turn, ending where the assistant starts to speak."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer: Any, user_text: str, system: str | None = None) -> list[int]:
    """Token ids of :func:`render_prompt` (the template already holds any special tokens)."""
    return tokenizer(render_prompt(tokenizer, user_text, system), add_special_tokens=False)["input_ids"]
