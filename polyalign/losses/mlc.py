"""MLC: multilingual-consistency loss (Bu et al., ICLR 2026; METHODS.md section 1).

Per example b, the L language variants of one prompt give vectors r_1..r_L. Normalise them,
take the singular values s_1 >= ... of the [L, D] matrix, and push all the energy into s_1:

    s~_j   = s_j / stopgrad(s_1)
    loss_b = -log softmax(s~ / tau)_1

The minimum is reached when the L vectors are collinear (rank 1): s~ = (1, 0, ..., 0), so
loss = -log(e^(1/tau) / (e^(1/tau) + L - 1)).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

EPS = 1e-12


def normalized_singular_values(reps: Tensor) -> Tensor:
    """[B, L, D] -> singular values [B, min(L, D)] of the row-normalised matrices, fp32 or wider."""
    z = reps.to(torch.promote_types(reps.dtype, torch.float32))
    z = z / (z.norm(dim=-1, keepdim=True) + EPS)          # [B, L, D], each language's vector unit-norm
    return torch.linalg.svdvals(z)                          # [B, L] descending


def mlc_loss_per_example(reps: Tensor, tau: float = 0.2) -> Tensor:
    """[B, L, D] -> [B] cross-entropy of the top singular value."""
    if reps.dim() != 3 or reps.shape[1] < 2:
        raise ValueError(f"reps must be [B, L>=2, D], got {tuple(reps.shape)}")
    s = normalized_singular_values(reps)                    # [B, L]
    s_tilde = s / s[:, :1].detach()                         # stop-gradient on the largest one
    return -torch.log_softmax(s_tilde / tau, dim=-1)[:, 0]  # [B]


def mlc_loss(reps: Tensor, tau: float = 0.2) -> Tensor:
    """Mean MLC loss over the batch; ``reps`` is [B, L, D] with one row per language."""
    return mlc_loss_per_example(reps, tau).mean()


def mlc_minimum(num_languages: int, tau: float = 0.2) -> float:
    """The rank-1 (collinear) value of the loss, for tests and logs."""
    import math

    return -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + num_languages - 1))


@torch.no_grad()
def top_singular_share(reps: Tensor) -> Tensor:
    """Mean of s_1^2 / sum s_j^2: 1.0 when every language's representation is collinear."""
    s = normalized_singular_values(reps)
    return (s[:, 0] ** 2 / (s**2).sum(-1)).mean()


@torch.no_grad()
def mean_pairwise_cosine(reps: Tensor) -> Tensor:
    """Mean cosine similarity over all language pairs (i < j) and examples."""
    z = reps.float() / (reps.float().norm(dim=-1, keepdim=True) + EPS)
    sim = z @ z.transpose(1, 2)                             # [B, L, L]
    L = reps.shape[1]
    iu = torch.triu_indices(L, L, offset=1)
    return sim[:, iu[0], iu[1]].mean()


class MLCHead(nn.Module):
    """Projection r = W h + b (Linear(H, 512), Xavier-uniform weight, zero bias), trained with the
    policy and saved with the checkpoint; ``projection="none"`` uses h directly."""

    def __init__(self, hidden_size: int, dim: int = 512, projection: str = "linear", seed: int | None = None):
        super().__init__()
        if projection not in ("linear", "none"):
            raise ValueError(f"projection must be 'linear' or 'none', got {projection!r}")
        self.projection = projection
        if projection == "linear":
            self.proj = nn.Linear(hidden_size, dim)
            # A seeded generator makes the head identical however much global RNG set-up consumed
            # (one process vs accelerate launch, fresh run vs resume).
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            nn.init.xavier_uniform_(self.proj.weight, generator=gen)
            nn.init.zeros_(self.proj.bias)

    def forward(self, h: Tensor) -> Tensor:
        if self.projection == "none":
            return h
        return self.proj(h.to(self.proj.weight.dtype))
