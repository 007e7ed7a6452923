"""Chat backends: one ``complete(system, user) -> str`` over an OpenAI-compatible endpoint or a
local Hugging Face chat model. Judges and translators both use them."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Protocol

from polyalign.errors import PolyalignError


class ChatBackend(Protocol):
    def complete(self, system: str, user: str) -> str: ...


class OpenAIChat:
    """OpenAI-compatible ``/chat/completions`` over HTTP with retries and backoff.

    The key comes from ``api_key_env`` and is sent only in the Authorization header: never logged,
    never written to any file.
    """

    def __init__(self, model: str, base_url: str, api_key_env: str = "POLYALIGN_API_KEY", max_retries: int = 4,
                 timeout: float = 60.0, backoff: float = 1.0, min_interval: float = 0.0):
        self.model, self.base_url = model, base_url.rstrip("/")
        self.api_key_env, self.max_retries, self.timeout, self.backoff = api_key_env, max_retries, timeout, backoff
        self.min_interval, self._last = min_interval, 0.0

    def complete(self, system: str, user: str, temperature: float = 0.0) -> str:
        body = json.dumps({"model": self.model, "temperature": temperature,
                           "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]})
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        last_err = ""
        for attempt in range(self.max_retries + 1):
            wait = self.min_interval - (time.monotonic() - self._last)
            if wait > 0:
                time.sleep(wait)
            self._last = time.monotonic()
            req = urllib.request.Request(f"{self.base_url}/chat/completions", body.encode(), headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    data = json.loads(resp.read().decode("utf-8"))
                return str(data["choices"][0]["message"]["content"])
            except urllib.error.HTTPError as e:
                last_err = f"HTTP {e.code}"
                if e.code not in (408, 409, 429) and e.code < 500:
                    break  # a client error will not go away by retrying
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last_err = f"unreachable ({getattr(e, 'reason', e)})"
            except (json.JSONDecodeError, KeyError, IndexError, TypeError):
                last_err = "malformed response body"
            if attempt < self.max_retries:
                time.sleep(self.backoff * 2**attempt)
        raise PolyalignError(f"chat endpoint {self.base_url} failed after {self.max_retries + 1} tries: {last_err}")


class HFChat:
    """A local Hugging Face chat model as backend (greedy)."""

    def __init__(self, spec: str, max_new_tokens: int = 16):
        from polyalign.models import load_model, load_tokenizer

        self.tok, self.model, self.max_new_tokens = load_tokenizer(spec), load_model(spec), max_new_tokens

    def complete(self, system: str, user: str) -> str:
        import torch

        msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = self.tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = self.model.generate(**ids, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tok.pad_token_id)
        return self.tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
