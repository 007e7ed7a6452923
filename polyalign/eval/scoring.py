"""Task-specific scoring pieces: MGSM numeric match and MMLU 5-shot log-likelihood."""

from __future__ import annotations

import re
from typing import Any

_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> float | None:
    """The last number in a response (commas removed), the usual MGSM extraction."""
    nums = _NUM.findall(text.replace("\u066b", ".").replace("\u066c", ","))
    if not nums:
        return None
    try:
        return float(nums[-1].replace(",", ""))
    except ValueError:
        return None


def mgsm_correct(response: str, answer: str) -> bool:
    got = last_number(response)
    try:
        return got is not None and abs(got - float(answer.replace(",", ""))) < 1e-6
    except ValueError:
        return False


def mmlu_prompt(question: str, choices: list[str], shots: list[tuple[str, list[str], str]], subject: str) -> str:
    head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"

    def fmt(q: str, cs: list[str]) -> str:
        return q + "\n" + "\n".join(f"{letter}. {c}" for letter, c in zip("ABCD", cs)) + "\nAnswer:"
    return head + "".join(fmt(q, cs) + f" {a}\n\n" for q, cs, a in shots) + fmt(question, choices)


def mmlu_choice(model: Any, tokenizer: Any, prompt: str) -> str:
    """The letter among A-D with the highest next-token log-probability after the prompt."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = model(**{k: v.to(next(model.parameters()).device) for k, v in ids.items()}).logits[0, -1]
    letter_ids = [tokenizer.encode(" " + c, add_special_tokens=False)[-1] for c in "ABCD"]
    return "ABCD"[int(torch.stack([logits[i] for i in letter_ids]).argmax())]
