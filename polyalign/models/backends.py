"""Chat backends: one ``complete(system, user) -> str`` over an OpenAI-compatible endpoint or a
local Hugging Face chat model. Judges and translators both use them."""

from __future__ import annotations

import os
import time
from typing import Protocol

from polyalign.errors import PolyalignError


class ChatBackend(Protocol):
    def complete(self, system: str, user: str) -> str: ...


class OpenAIChat:
    """An OpenAI-compatible ``/chat/completions`` endpoint through the ``openai`` client.

    The client retries 408/409/429/5xx and connection errors with exponential backoff and honours
    the server's ``Retry-After``; we add one thing it lacks: a 200 whose body is not a chat
    completion is retried too. The key comes from ``$api_key_env`` and goes only into the client's
    Authorization header: never logged, never written to a file, never part of an error message.
    Needs the optional extra: ``pip install 'polyalign[openai]'``.
    """

    def __init__(self, model: str, base_url: str, api_key_env: str = "POLYALIGN_API_KEY", max_retries: int = 4,
                 timeout: float = 60.0, min_interval: float = 0.0):
        try:
            import openai
        except ImportError:
            raise PolyalignError("the OpenAI-compatible judge/translator needs the openai client: "
                                 "pip install 'polyalign[openai]'") from None
        self.model, self.base_url, self.max_retries = model, base_url.rstrip("/"), max_retries
        self.min_interval, self._last = min_interval, 0.0
        # A local endpoint may need no key; the client insists on one, so a placeholder stands in.
        self.client = openai.OpenAI(base_url=self.base_url, api_key=os.environ.get(api_key_env) or "no-key",
                                    max_retries=max_retries, timeout=timeout)

    def complete(self, system: str, user: str, temperature: float = 0.0) -> str:
        import openai

        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        for _ in range(self.max_retries + 1):
            wait = self.min_interval - (time.monotonic() - self._last)
            if wait > 0:
                time.sleep(wait)
            self._last = time.monotonic()
            try:
                resp = self.client.chat.completions.create(model=self.model, messages=messages,
                                                           temperature=temperature)
                return str(resp.choices[0].message.content)
            except openai.APIStatusError as e:
                last_err = f"HTTP {e.status_code}"
                break                            # the client already retried what retrying can fix
            except openai.APIConnectionError as e:
                last_err = f"unreachable ({type(e).__name__})"
                break
            except (openai.APIResponseValidationError, AttributeError, IndexError, TypeError):
                last_err = "malformed response body"  # a garbled 200: ask again
        tries = self.max_retries + 1
        raise PolyalignError(f"chat endpoint {self.base_url} failed after {tries} tries: {last_err}")


class HFChat:
    """A local Hugging Face chat model as backend (greedy), batched.

    Inputs go to the model's own device (a judge on the GPU gets CUDA tensors), and
    :meth:`complete_many` answers ``batch_size`` prompts per ``generate`` call, left-padded."""

    def __init__(self, spec: str, max_new_tokens: int = 16, batch_size: int = 16):
        from polyalign.models import load_model, load_tokenizer

        self.tok, self.model, self.max_new_tokens = load_tokenizer(spec), load_model(spec), max_new_tokens
        self.batch_size = batch_size

    def complete(self, system: str, user: str) -> str:
        return self.complete_many(system, [user])[0]

    def complete_many(self, system: str, users: list[str]) -> list[str]:
        """One answer per user turn, in order (greedy; padding does not change them)."""
        import torch

        texts = [self.tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": u}],
                                              tokenize=False, add_generation_prompt=True) for u in users]
        device = next(self.model.parameters()).device
        answers: list[str] = []
        old_side, self.tok.padding_side = self.tok.padding_side, "left"   # new tokens follow each prompt
        try:
            for i in range(0, len(texts), self.batch_size):
                enc = self.tok(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                               add_special_tokens=False).to(device)
                with torch.no_grad():
                    out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                              pad_token_id=self.tok.pad_token_id)
                answers += self.tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        finally:
            self.tok.padding_side = old_side
        return answers
