"""Does a prompt's form alone give its class away?

A deliberately plain naive-Bayes classifier over three surface features of the English text: the
first word, the final punctuation mark and a length bucket. If it separates harmful from benign
prompts well, a student can learn "refuse imperatives" (or "answer questions") and pass the
benchmark without learning anything about harm. ``polyalign data inspect`` prints its accuracy
(English train -> English test) and ``tests/test_benchmark_v3.py`` holds the built-in benchmark to
at most 62 %.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence

import regex

from polyalign.data.records import ParallelRecord

LENGTH_BUCKETS = (8, 12, 16, 20)    # word-count upper bounds; longer texts share one last bucket
FEATURES = ("first_word", "final_punct", "length")


def form_features(text: str) -> dict[str, str]:
    """The three form features of one text: lower-cased first word (letters and apostrophes),
    last non-space character if it is punctuation (else "none"), and a word-count bucket."""
    words = text.split()
    first = regex.sub(r"[^\p{L}']", "", words[0]).lower() if words else ""
    last = text.rstrip()[-1:] if text.strip() else ""
    punct = last if last and not last.isalnum() else "none"
    n = len(words)
    bucket = next((f"<={b}" for b in LENGTH_BUCKETS if n <= b), f">{LENGTH_BUCKETS[-1]}")
    return {"first_word": first, "final_punct": punct, "length": bucket}


class FormNaiveBayes:
    """Multinomial-over-values naive Bayes with add-one (Laplace) smoothing; a value never seen in
    training counts as one extra value of its feature."""

    def __init__(self) -> None:
        self.prior: Counter[str] = Counter()
        self.counts: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
        self.values: dict[str, set[str]] = defaultdict(set)

    def fit(self, texts: Sequence[str], labels: Sequence[str]) -> FormNaiveBayes:
        for text, label in zip(texts, labels, strict=True):
            self.prior[label] += 1
            for name, value in form_features(text).items():
                self.counts[label, name][value] += 1
                self.values[name].add(value)
        return self

    def log_scores(self, text: str) -> dict[str, float]:
        total = sum(self.prior.values())
        out = {}
        for label, n in self.prior.items():
            score = math.log(n / total)
            for name, value in form_features(text).items():
                k = len(self.values[name]) + 1      # +1: room for an unseen value
                score += math.log((self.counts[label, name][value] + 1) / (n + k))
            out[label] = score
        return out

    def predict(self, text: str) -> str:
        scores = self.log_scores(text)
        return max(sorted(scores), key=scores.__getitem__)   # ties: alphabetical, deterministic


def form_accuracy(records: Sequence[ParallelRecord], lang: str = "en", train: str = "train",
                  test: str = "test") -> tuple[float, int] | None:
    """Accuracy of the form-only classifier trained on ``train`` records' ``lang`` texts and scored
    on ``test`` records' (by ``meta.split``), with the number scored; None when either side is
    missing or the training side has a single class."""
    def side(split: str) -> list[ParallelRecord]:
        return [r for r in records if r.meta.get("split") == split and r.category and lang in r.texts]

    tr, te = side(train), side(test)
    if not te or len({r.category for r in tr}) < 2:
        return None
    model = FormNaiveBayes().fit([r.texts[lang] for r in tr], [str(r.category) for r in tr])
    right = sum(model.predict(r.texts[lang]) == r.category for r in te)
    return right / len(te), len(te)


def split_counts(records: Sequence[ParallelRecord]) -> dict[str, Counter[str]]:
    """Records per split and category: {split: Counter(category)}."""
    out: dict[str, Counter[str]] = defaultdict(Counter)
    for r in records:
        out[str(r.meta.get("split"))][str(r.category)] += 1
    return dict(out)
