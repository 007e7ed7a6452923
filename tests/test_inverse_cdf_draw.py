"""Issue #26: the inverse-CDF draw samples from the same distribution as ``torch.multinomial``.

``InverseCDFDraw`` replaces ``generate``'s multinomial draw (an exponential variate per vocabulary
entry) with one uniform per row against the cumulative probabilities. Checked here against an
explicit float64 loop fed the same uniforms, by a chi-square test of its frequencies (temperature,
top-p and ``-inf`` entries included), and inside ``generate``.
"""

import math

import pytest
import torch

from polyalign.models import load_model, load_tokenizer
from polyalign.models.batching import left_pad
from polyalign.models.chat import prompt_ids
from polyalign.models.sampling import InverseCDFDraw, sampling_kwargs
from polyalign.train.msd_config import MSDConfig


def reference_draw(scores: torch.Tensor, uniforms: torch.Tensor) -> list[int]:
    """The textbook inverse CDF, one row and one token at a time, in float64: walk the vocabulary,
    adding p_i, and stop at the first token whose running sum exceeds u * total."""
    out = []
    for row, u in zip(scores.tolist(), uniforms[:, 0].tolist(), strict=True):
        top = max(row)
        weights = [math.exp(s - top) if s != -math.inf else 0.0 for s in row]
        total, acc = sum(weights), 0.0
        target = u * total
        for i, w in enumerate(weights):
            acc += w
            if target < acc:
                out.append(i)
                break
        else:
            out.append(max(i for i, w in enumerate(weights) if w > 0))
    return out


def test_draw_matches_an_explicit_float64_loop():
    torch.manual_seed(0)
    scores = torch.randn(300, 64) * 3
    scores[:, ::7] = float("-inf")                      # entries no draw may pick
    torch.manual_seed(123)
    out = InverseCDFDraw()(None, scores)
    torch.manual_seed(123)
    uniforms = torch.rand(300, 1, dtype=torch.float64)  # the processor's own uniforms, same stream
    drawn = out.argmax(-1).tolist()
    assert drawn == reference_draw(scores, uniforms)
    assert (out.isfinite().sum(-1) == 1).all()           # one finite score per row: greedy takes the draw
    assert all(i % 7 != 0 for i in drawn)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    keep = probs > 0
    expected = probs[keep] * counts.sum()
    return float(((counts[keep] - expected) ** 2 / expected).sum())


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.5, 1.0), (1.0, 0.8)])
def test_draw_frequencies_match_the_tempered_truncated_distribution(temperature, top_p):
    """40,000 draws through the processors ``sampling_kwargs`` builds, against the probabilities
    written out by hand: softmax(scores / T), then top-p's smallest set of mass >= top_p."""
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05, 0.0])
    scores = probs.log().expand(40_000, -1).clone()
    chain = sampling_kwargs(4, temperature, top_p, draw="inverse_cdf")["logits_processor"]
    torch.manual_seed(7)
    drawn = chain(None, scores).argmax(-1)
    counts = torch.bincount(drawn, minlength=5).double()
    expected = probs.double() ** (1 / temperature)
    if top_p < 1:
        expected[2:] = 0.0                            # 0.6 + 0.25 >= 0.8: the two largest stay
    expected /= expected.sum()
    assert counts[expected == 0].sum() == 0
    # chi-square, 1-2 degrees of freedom: 13.8 is the 0.999 quantile of 2 (a fixed seed: no flakes)
    assert chi_square(counts, expected) < 13.8, (counts / counts.sum(), expected)
    if temperature == 1.0 and top_p == 1.0:         # and the same law as torch.multinomial's draws
        torch.manual_seed(8)
        multi = torch.bincount(torch.multinomial(probs.expand(40_000, -1), 1)[:, 0], minlength=5).double()
        assert (multi / 40_000 - counts / 40_000).abs().max() < 0.01


def test_sampling_kwargs_keeps_greedy_and_multinomial_as_they_were():
    assert "logits_processor" not in sampling_kwargs(8, 0.0, draw="inverse_cdf")      # greedy: no draw at all
    multi = sampling_kwargs(8, 1.0)
    assert multi["do_sample"] and "logits_processor" not in multi
    fast = sampling_kwargs(8, 0.7, 0.9, top_k=5, draw="inverse_cdf")
    assert not fast["do_sample"] and fast["temperature"] is None and fast["top_p"] is None
    assert [type(p).__name__ for p in fast["logits_processor"]] == [
        "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "InverseCDFDraw"]
    with pytest.raises(ValueError, match="draw must be one of"):
        sampling_kwargs(8, 1.0, draw="gumbel")
    with pytest.raises(ValueError, match="draw must be one of"):
        MSDConfig(draw="gumbel")
    assert MSDConfig().draw == "inverse_cdf"


def test_generate_takes_the_drawn_token():
    """Inside ``generate``: the first sampled token is the draw over the model's own next-token
    logits with the same seed, and a longer sample is reproducible from its seed."""
    spec = "builtin:tiny-random"
    model, tok = load_model(spec).eval(), load_tokenizer(spec)
    ids, mask, _ = left_pad([prompt_ids(tok, q) for q in ("Hello there", "Wie geht es dir heute?")],
                            tok.pad_token_id)
    kwargs = {**sampling_kwargs(1, 1.0, pad_token_id=tok.pad_token_id, draw="inverse_cdf"), "attention_mask": mask}
    torch.manual_seed(5)
    first = model.generate(input_ids=ids, **kwargs)[:, -1]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    torch.manual_seed(5)
    assert first.tolist() == InverseCDFDraw()(None, logits).argmax(-1).tolist()
    kwargs = {**sampling_kwargs(12, 1.0, pad_token_id=tok.pad_token_id, draw="inverse_cdf"), "attention_mask": mask}
    runs = []
    for _ in range(2):
        torch.manual_seed(9)
        runs.append(model.generate(input_ids=ids, **kwargs)[:, ids.shape[1]:])
    assert torch.equal(runs[0], runs[1]) and runs[0].shape[1] >= 1



def test_draw_at_u_equal_to_the_total_takes_the_last_token(monkeypatch):
    """u = r * total with r < 1 can round up to the total, where no cdf entry exceeds u: the draw
    then takes the last token instead of an out-of-range index (the search covers the whole
    cumulative sum and clamps, rather than copying its first V - 1 entries every token). Forced
    here with r = 1; for every other r the explicit loop above is the reference."""
    scores = torch.randn(6, 40)
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.ones(*a, dtype=k.get("dtype")))
    out = InverseCDFDraw()(None, scores)
    assert out.argmax(-1).tolist() == [39] * 6 and (out.isfinite().sum(-1) == 1).all()
