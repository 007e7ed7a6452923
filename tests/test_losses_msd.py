"""MSD losses against slow float64 loops, gradient checks and DPSW edge cases."""

import math

import pytest
import torch

from polyalign.losses import msd as msd_mod
from polyalign.losses.msd import dpsw_raw_weights, dpsw_weights, msd_loss, token_divergence


def ref_divergence(s_logits, t_logits, kind, beta):
    """One position, explicit loops over the vocabulary, float64."""
    def softmax(x):
        m = max(x)
        e = [math.exp(v - m) for v in x]
        z = sum(e)
        return [v / z for v in e]
    ps, pt = softmax(s_logits), softmax(t_logits)

    def kl(p, q):
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)
    if kind == "reverse_kl":
        return kl(ps, pt)
    if kind == "forward_kl":
        return kl(pt, ps)
    m = [(1 - beta) * a + beta * b for a, b in zip(ps, pt)]
    return beta * kl(pt, m) + (1 - beta) * kl(ps, m)


def ref_dpsw(s_logits, t_logits, k):
    """Raw DPSW weight at one position, loops, float64."""
    V = len(t_logits)
    k = min(k, V)
    order = sorted(range(V), key=lambda v: -t_logits[v])[:k]
    m = max(t_logits[v] for v in order)
    e = [math.exp(t_logits[v] - m) for v in order]
    p = [x / sum(e) for x in e]
    H = -sum(x * math.log(x) for x in p if x > 0)
    w_t = 1 - H / math.log(k) if k > 1 else 1.0
    ms = max(s_logits)
    es = [math.exp(x - ms) for x in s_logits]
    p_star = es[order[0]] / sum(es)
    return w_t * (1 - p_star)


def ref_msd(s, t, mask, kind, beta, dpsw, k):
    """The whole loss with loops: mean over valid rows of (1/L_y) sum_t w~_t D_t."""
    rows = []
    for b in range(s.shape[0]):
        pos = [i for i in range(s.shape[1]) if mask[b, i]]
        if not pos:
            continue
        D = [ref_divergence(s[b, i].tolist(), t[b, i].tolist(), kind, beta) for i in pos]
        if dpsw:
            w = [ref_dpsw(s[b, i].tolist(), t[b, i].tolist(), k) for i in pos]
            w = [len(pos) * x / sum(w) for x in w] if sum(w) > 0 else [1.0] * len(pos)
        else:
            w = [1.0] * len(pos)
        rows.append(sum(wi * di for wi, di in zip(w, D)) / len(pos))
    return sum(rows) / len(rows)


@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1)])
def test_token_divergence_matches_loop(kind, beta):
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 11, dtype=torch.float64) * 3, torch.randn(2, 3, 11, dtype=torch.float64) * 3
    d = token_divergence(s, t, kind, beta)
    assert d.shape == (2, 3)
    for b in range(2):
        for i in range(3):
            assert d[b, i].item() == pytest.approx(ref_divergence(s[b, i].tolist(), t[b, i].tolist(), kind, beta),
                                                   rel=1e-10, abs=1e-12)
    d32 = token_divergence(s.float(), t.float(), kind, beta)
    assert d32.dtype == torch.float32 and torch.allclose(d32.double(), d, rtol=1e-4, atol=1e-6)


def test_divergence_zero_when_equal_and_bf16_computed_in_fp32():
    x = torch.randn(4, 50)
    assert torch.allclose(token_divergence(x, x), torch.zeros(4), atol=1e-6)
    xb, yb = x.bfloat16(), torch.randn(4, 50).bfloat16()
    d = token_divergence(xb, yb)
    assert d.dtype == torch.float32                          # bf16 logits, fp32 arithmetic
    torch.testing.assert_close(d, token_divergence(xb.float(), yb.float()))


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_gradcheck_divergence(kind, monkeypatch):
    monkeypatch.setattr(msd_mod, "CHUNK_ROWS", 2)           # exercise the chunk loop in backward too
    s = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 7, dtype=torch.float64)
    w = torch.rand(2, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: (token_divergence(x, t, kind, 0.3) * w).sum(), (s,))


def test_teacher_gets_no_gradient():
    s = torch.randn(2, 3, 7, requires_grad=True)
    t = torch.randn(2, 3, 7, requires_grad=True)
    msd_loss(s, t, torch.ones(2, 3, dtype=torch.bool)).backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
@pytest.mark.parametrize("dpsw", [True, False])
def test_msd_loss_matches_loop(kind, dpsw):
    torch.manual_seed(1)
    s, t = torch.randn(3, 5, 40, dtype=torch.float64) * 2, torch.randn(3, 5, 40, dtype=torch.float64) * 2
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    got = msd_loss(s, t, mask, kind=kind, dpsw=dpsw, top_k=8).item()
    assert got == pytest.approx(ref_msd(s, t, mask, kind, 0.5, dpsw, 8), rel=1e-9)


def test_msd_gradcheck_with_dpsw():
    s = torch.randn(2, 4, 9, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, 9, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    # DPSW weights are constants: gradcheck with them fixed at their value for the current s.
    w = dpsw_weights(s, t, mask, top_k=4)

    def f(x):
        d = token_divergence(x, t)
        return ((w * d * mask).sum(-1) / mask.sum(-1)).mean()
    assert torch.autograd.gradcheck(f, (s,))
    torch.testing.assert_close(f(s), msd_loss(s, t, mask, top_k=4))


def test_dpsw_raw_matches_loop_and_normalised_mean_is_one():
    torch.manual_seed(2)
    s, t = torch.randn(2, 6, 30, dtype=torch.float64), torch.randn(2, 6, 30, dtype=torch.float64) * 4
    raw = dpsw_raw_weights(s, t, top_k=5)
    for b in range(2):
        for i in range(6):
            assert raw[b, i].item() == pytest.approx(ref_dpsw(s[b, i].tolist(), t[b, i].tolist(), 5), rel=1e-5)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    w = dpsw_weights(s, t, mask, top_k=5)
    assert torch.all(w[~mask] == 0)
    for b in range(2):
        assert w[b][mask[b]].mean().item() == pytest.approx(1.0)


def test_dpsw_edge_cases():
    V = 6
    # Teacher uniform over its top-K -> entropy log K -> teacher weight 0 -> row falls back to 1s.
    s = torch.randn(1, 3, V)
    t = torch.zeros(1, 3, V)
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    assert torch.equal(dpsw_weights(s, t, mask, top_k=V), torch.tensor([[1.0, 1.0, 0.0]]))
    # top_k larger than the vocabulary uses the whole vocabulary.
    s2, t2 = torch.randn(1, 2, V), torch.randn(1, 2, V)
    assert torch.allclose(dpsw_raw_weights(s2, t2, top_k=1000), dpsw_raw_weights(s2, t2, top_k=V))
    # top_k = 1: the teacher weight is 1, only the student term remains.
    ps_star = torch.softmax(s2, -1).gather(-1, t2.argmax(-1, keepdim=True)).squeeze(-1)
    assert torch.allclose(dpsw_raw_weights(s2, t2, top_k=1), 1 - ps_star)
    # an all-False mask gives all-zero weights; msd_loss with no valid row is 0 and backpropagates.
    assert torch.equal(dpsw_weights(s2, t2, torch.zeros(1, 2, dtype=torch.bool)), torch.zeros(1, 2))
    x = torch.randn(1, 2, V, requires_grad=True)
    loss = msd_loss(x, t2, torch.zeros(1, 2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0 and torch.all(x.grad == 0)
    assert not dpsw_weights(x, t2, torch.ones(1, 2, dtype=torch.bool)).requires_grad


def test_padding_invariance():
    """Extra masked-out positions (padding) do not change the loss."""
    s, t = torch.randn(1, 4, 12, dtype=torch.float64), torch.randn(1, 4, 12, dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    pad_s = torch.cat([torch.randn(1, 3, 12, dtype=torch.float64), s], 1)
    pad_t = torch.cat([torch.randn(1, 3, 12, dtype=torch.float64), t], 1)
    pad_m = torch.cat([torch.zeros(1, 3, dtype=torch.bool), mask], 1)
    torch.testing.assert_close(msd_loss(s, t, mask), msd_loss(pad_s, pad_t, pad_m))


def test_bad_arguments():
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match="kind"):
        token_divergence(x, x, kind="kl")
    with pytest.raises(ValueError, match="beta"):
        token_divergence(x, x, kind="jsd", beta=0.0)
    with pytest.raises(ValueError, match="differ"):
        token_divergence(x, torch.randn(2, 6))
