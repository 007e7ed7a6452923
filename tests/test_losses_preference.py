"""SimPO and ORPO against float64 references written from the papers' formulas, plus gradients."""

import math

import pytest
import torch

from polyalign.losses.preference import log1m_exp, orpo_loss, simpo_loss


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def reference_simpo(cw, cl, nw, nl, beta, gamma):
    """SimPO paper eq. 6, one pair at a time."""
    total = 0.0
    for lw, ll, tw, tl in zip(cw, cl, nw, nl, strict=True):
        total += -log_sigmoid(beta / tw * lw - beta / tl * ll - gamma)
    return total / len(cw)


def reference_orpo(cw, cl, nw, nl, beta):
    """ORPO paper eqs. 2-7: p = exp(mean log p); odds = p / (1 - p); NLL + beta * L_OR."""
    total = 0.0
    for lw, ll, tw, tl in zip(cw, cl, nw, nl, strict=True):
        pw, pl = math.exp(lw / tw), math.exp(ll / tl)
        log_or = math.log(pw / (1 - pw)) - math.log(pl / (1 - pl))
        total += -lw / tw - beta * log_sigmoid(log_or)
    return total / len(cw)


def pairs(seed: int, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    lens_w = torch.randint(1, 40, (n,), generator=g).double()
    lens_l = torch.randint(1, 40, (n,), generator=g).double()
    # summed log-probs: mean per-token log-prob between -4 and -0.01
    cw = -(torch.rand(n, generator=g, dtype=torch.float64) * 4 + 0.01) * lens_w
    cl = -(torch.rand(n, generator=g, dtype=torch.float64) * 4 + 0.01) * lens_l
    return cw, cl, lens_w, lens_l


@pytest.mark.parametrize("seed,beta,gamma", [(0, 2.0, 0.5), (1, 0.1, 0.5), (2, 2.5, 1.4)])
def test_simpo_matches_reference(seed, beta, gamma):
    cw, cl, nw, nl = pairs(seed)
    ours = simpo_loss(cw, cl, nw, nl, beta, gamma).item()
    assert ours == pytest.approx(reference_simpo(cw.tolist(), cl.tolist(), nw.tolist(), nl.tolist(), beta, gamma),
                                 rel=1e-12)


@pytest.mark.parametrize("seed,beta", [(0, 0.1), (1, 1.0), (3, 0.25)])
def test_orpo_matches_reference(seed, beta):
    cw, cl, nw, nl = pairs(seed)
    ours = orpo_loss(cw, cl, nw, nl, beta).item()
    assert ours == pytest.approx(reference_orpo(cw.tolist(), cl.tolist(), nw.tolist(), nl.tolist(), beta), rel=1e-10)


def test_gradients_pass_gradcheck():
    cw, cl, nw, nl = pairs(4)
    cw.requires_grad_(True)
    cl.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: simpo_loss(a, b, nw, nl, 2.0, 0.5), (cw, cl))
    assert torch.autograd.gradcheck(lambda a, b: orpo_loss(a, b, nw, nl, 0.1), (cw, cl))


def test_losses_prefer_the_chosen_response():
    """Raising the chosen log-prob (or lowering the rejected one) lowers both losses."""
    cw, cl, nw, nl = pairs(5)
    for loss in (lambda a, b: simpo_loss(a, b, nw, nl), lambda a, b: orpo_loss(a, b, nw, nl)):
        a, b = cw.clone().requires_grad_(True), cl.clone().requires_grad_(True)
        loss(a, b).backward()
        assert (a.grad < 0).all() and (b.grad > 0).all()


def test_log1m_exp_is_accurate_at_both_ends():
    x = torch.tensor([-1e-8, -0.1, -0.69, -0.7, -5.0, -40.0], dtype=torch.float64)
    expect = torch.tensor([math.log(-math.expm1(v)) for v in x.tolist()], dtype=torch.float64)
    assert torch.allclose(log1m_exp(x), expect, rtol=1e-12)
    # a response with mean log-prob ~0 gives a finite loss and gradient
    z = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    out = orpo_loss(z, torch.tensor([-3.0, -2.0], dtype=torch.float64), torch.ones(2), torch.ones(2))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(z.grad).all()
