"""MLC loss against a float64 numpy reference, its rank-1 minimum, invariances and gradients."""

import math

import numpy as np
import pytest
import torch

from polyalign.losses.mlc import (
    MLCHead,
    mean_pairwise_cosine,
    mlc_loss,
    mlc_loss_per_example,
    mlc_minimum,
    top_singular_share,
)


def reference_mlc(reps: np.ndarray, tau: float) -> float:
    """Explicit loops, float64, numpy SVD: the METHODS.md definition read literally."""
    losses = []
    for b in range(reps.shape[0]):
        z = np.stack([v / (np.sqrt(sum(x * x for x in v)) + 1e-12) for v in reps[b]])
        s = np.linalg.svd(z, compute_uv=False)
        st = [sj / s[0] for sj in s]
        denom = sum(math.exp(x / tau) for x in st)
        losses.append(-math.log(math.exp(st[0] / tau) / denom))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("B,L,D,tau", [(1, 2, 8, 0.2), (3, 4, 16, 0.2), (2, 10, 512, 0.5), (4, 6, 3, 0.1)])
def test_matches_float64_reference(B, L, D, tau):
    g = torch.Generator().manual_seed(B * 100 + L)
    reps = torch.randn(B, L, D, generator=g, dtype=torch.float64)
    assert mlc_loss(reps, tau).item() == pytest.approx(reference_mlc(reps.numpy(), tau), rel=1e-10)
    assert mlc_loss(reps.float(), tau).item() == pytest.approx(reference_mlc(reps.numpy(), tau), rel=1e-4)


def test_collinear_input_gives_rank_one_minimum():
    v = torch.randn(1, 1, 32, dtype=torch.float64)
    scales = torch.tensor([0.5, 2.0, 7.0, 1.0, 3.0], dtype=torch.float64).view(1, 5, 1)
    reps = v * scales                                   # 5 positive multiples of one vector
    expected = -math.log(math.exp(5) / (math.exp(5) + 5 - 1))
    assert mlc_minimum(5, 0.2) == pytest.approx(expected)
    assert mlc_loss(reps, 0.2).item() == pytest.approx(expected, abs=1e-9)
    assert top_singular_share(reps).item() == pytest.approx(1.0)
    assert mean_pairwise_cosine(reps).item() == pytest.approx(1.0)


def test_orthogonal_input_is_worse_than_collinear():
    reps = torch.eye(4, dtype=torch.float64).unsqueeze(0)   # 4 orthogonal unit vectors
    # all singular values 1 -> uniform softmax -> log L
    assert mlc_loss(reps, 0.2).item() == pytest.approx(math.log(4))
    assert mlc_loss(reps, 0.2).item() > mlc_minimum(4, 0.2)


def test_invariant_to_rescaling_each_language():
    reps = torch.randn(3, 5, 16, dtype=torch.float64)
    scale = torch.rand(3, 5, 1, dtype=torch.float64) * 10 + 0.1
    assert torch.allclose(mlc_loss_per_example(reps), mlc_loss_per_example(reps * scale))


def test_batch_order_invariance():
    reps = torch.randn(6, 3, 8, dtype=torch.float64)
    perm = torch.randperm(6)
    assert torch.allclose(mlc_loss_per_example(reps)[perm], mlc_loss_per_example(reps[perm]))


def reference_mlc_fixed_s1(reps: np.ndarray, s1: np.ndarray, tau: float) -> float:
    """The loss with s_1 in the denominator held at a constant: the function whose derivative
    the stop-gradient defines."""
    total = 0.0
    for b in range(reps.shape[0]):
        z = reps[b] / (np.linalg.norm(reps[b], axis=1, keepdims=True) + 1e-12)
        s = np.linalg.svd(z, compute_uv=False) / s1[b]
        total += -(s[0] / tau - math.log(sum(math.exp(x / tau) for x in s)))
    return total / reps.shape[0]


def test_gradient_matches_central_differences_with_stopgrad():
    reps = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    mlc_loss(reps, 0.2).backward()
    r0 = reps.detach().numpy()
    s1 = np.array([np.linalg.svd(r0[b] / np.linalg.norm(r0[b], axis=1, keepdims=True), compute_uv=False)[0]
                   for b in range(2)])
    num = np.zeros_like(r0)
    eps = 1e-6
    for idx in np.ndindex(r0.shape):
        up, dn = r0.copy(), r0.copy()
        up[idx] += eps
        dn[idx] -= eps
        num[idx] = (reference_mlc_fixed_s1(up, s1, 0.2) - reference_mlc_fixed_s1(dn, s1, 0.2)) / (2 * eps)
    np.testing.assert_allclose(reps.grad.numpy(), num, rtol=1e-5, atol=1e-8)


def test_gradient_descent_lowers_loss():
    x = torch.randn(2, 4, 8, requires_grad=True)
    before = mlc_loss(x).item()
    for _ in range(50):
        loss = mlc_loss(x)
        (g,) = torch.autograd.grad(loss, x)
        x = (x - 0.5 * g).detach().requires_grad_(True)
    assert mlc_loss(x).item() < before - 0.1


def test_rejects_single_language():
    with pytest.raises(ValueError, match="L>=2"):
        mlc_loss(torch.randn(2, 1, 4))


def test_head_init_and_none_projection():
    head = MLCHead(64)
    assert head.proj.weight.shape == (512, 64) and torch.all(head.proj.bias == 0)
    bound = math.sqrt(6 / (64 + 512))                       # Xavier-uniform bound
    assert head.proj.weight.abs().max() <= bound
    h = torch.randn(2, 64)
    assert torch.equal(MLCHead(64, projection="none")(h), h)
    with pytest.raises(ValueError):
        MLCHead(64, projection="mlp")
