"""MSD: multilingual self-distillation with DPSW (Qin et al. 2026; METHODS.md section 2).

Per sequence, over the L_y response positions t (mask True):

    L = (1 / L_y) * sum_t w~_t * D(p_S(. | x_tgt, y<t) || p_T(. | x_tgt, x*, C, y<t))

D is computed over the full vocabulary in fp32 by :class:`_ChunkedDivergence`, chunk by chunk so
no [N, V] fp32 intermediates (log-softmaxes, probabilities) live beyond one chunk. Each chunk also
yields the closed-form gradient w.r.t. the student logits, kept (in the logits' dtype) as the one
[N, V] tensor saved for backward, which is then a multiply:

    dD/ds_j = p_S,j * (g_j - sum_i p_S,i g_i)      (chain rule through softmax)

with g = dD/dp_S:  reverse KL: log p_S - log p_T (+1, cancels);  forward KL: -p_T / p_S;
JSD: (1 - beta) * (log p_S - log m). The teacher gets no gradient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

KINDS = ("reverse_kl", "forward_kl", "jsd")
CHUNK_ROWS = 256
WEIGHT_FLOOR = 1e-6  # teacher weights below this are rounding noise (1 - H/log K of a uniform top-K)  # rows of [chunk, V] live at once: 256 x 151,936 x 4 B = 155 MB per temporary


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _divergence_rows(s: Tensor, t: Tensor, kind: str, beta: float, want_grad: bool):
    """Rows of logits [n, V] -> (D [n], dD/ds [n, V] or None)."""
    dt = _compute_dtype(s)
    ls, lt = torch.log_softmax(s.to(dt), -1), torch.log_softmax(t.to(dt), -1)
    ps = ls.exp()
    if kind == "reverse_kl":
        g = ls - lt
        d = (ps * g).sum(-1)
    elif kind == "forward_kl":
        pt = lt.exp()
        d = (pt * (lt - ls)).sum(-1)
        g = None
    else:  # jsd
        lm = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)]), 0)
        pt = lt.exp()
        d = beta * (pt * (lt - lm)).sum(-1) + (1 - beta) * (ps * (ls - lm)).sum(-1)
        g = (1 - beta) * (ls - lm)
    if not want_grad:
        return d, None
    if kind == "forward_kl":
        grad = ps - pt                                       # the -p_T/p_S form, simplified
    elif kind == "reverse_kl":
        grad = g.sub_(d[:, None]).mul_(ps)                   # sum_i p_S,i g_i is D itself; in place
    else:
        grad = ps * (g - (ps * g).sum(-1, keepdim=True))
    return d, grad


class _ChunkedDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, kind: str, beta: float, chunk: int) -> Tensor:  # s, t: [N, V]
        want_grad = ctx.needs_input_grad[0]
        out = torch.empty(s.shape[0], dtype=_compute_dtype(s), device=s.device)
        grad = torch.empty_like(s) if want_grad else None
        for i in range(0, s.shape[0], chunk):
            d, g = _divergence_rows(s[i:i + chunk], t[i:i + chunk], kind, beta, want_grad)
            out[i:i + chunk] = d
            if want_grad:                    # the gradient costs little more once log-softmaxes exist
                grad[i:i + chunk] = g.to(s.dtype)
        if want_grad:
            ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out[:, None].to(grad.dtype), None, None, None, None


def token_divergence(student_logits: Tensor, teacher_logits: Tensor, kind: str = "reverse_kl",
                     beta: float = 0.5) -> Tensor:
    """Per-position divergence over the last (vocabulary) dim, natural log: [..., V] -> [...].

    ``reverse_kl`` = KL(p_S || p_T) (the paper's default), ``forward_kl`` = KL(p_T || p_S),
    ``jsd`` = beta KL(p_T || m) + (1 - beta) KL(p_S || m), m = (1 - beta) p_S + beta p_T.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "jsd" and not 0 < beta < 1:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} differ")
    lead, V = student_logits.shape[:-1], student_logits.shape[-1]
    d = _ChunkedDivergence.apply(student_logits.reshape(-1, V), teacher_logits.detach().reshape(-1, V),
                                 kind, beta, CHUNK_ROWS)
    return d.reshape(lead)


@torch.no_grad()
def dpsw_raw_weights(student_logits: Tensor, teacher_logits: Tensor, top_k: int = 32) -> Tensor:
    """w_t = w^T_t * w^S_t before normalisation, [..., V] -> [...].

    w^T = 1 - H(teacher's top-K renormalised) / log K (a confident teacher counts more);
    w^S = 1 - p_S(y*_t), y* = teacher argmax (positions the student gets wrong count more).
    """
    V = student_logits.shape[-1]
    k = min(top_k, V)
    dt = _compute_dtype(student_logits)
    out = torch.empty(student_logits.shape[:-1], device=student_logits.device, dtype=dt).reshape(-1)
    s2, t2 = student_logits.reshape(-1, V), teacher_logits.reshape(-1, V)
    for i in range(0, s2.shape[0], CHUNK_ROWS):
        t = t2[i:i + CHUNK_ROWS].to(dt)
        top_logits, top_idx = t.topk(k, dim=-1)             # [n, k]; top_idx[:, 0] = y*
        lp = torch.log_softmax(top_logits, -1)               # renormalised top-K
        entropy = -(lp.exp() * lp).sum(-1)
        w_t = 1 - entropy / math.log(k) if k > 1 else torch.ones_like(entropy)
        w_t = torch.where(w_t < WEIGHT_FLOOR, torch.zeros_like(w_t), w_t)  # rounding noise of a uniform top-K
        p_star = torch.log_softmax(s2[i:i + CHUNK_ROWS].to(dt), -1).gather(-1, top_idx[:, :1]).squeeze(-1).exp()
        out[i:i + CHUNK_ROWS] = w_t * (1 - p_star)
    return out.reshape(student_logits.shape[:-1])


@torch.no_grad()
def normalize_weights(raw: Tensor, mask: Tensor) -> Tensor:
    """w~ = L_y * w / sum w per row (mean 1 over masked positions), 0 off the mask; a row whose
    weights sum to 0 falls back to uniform weights."""
    m = mask.to(raw.dtype)
    w = raw * m
    total = w.sum(-1, keepdim=True)
    n = m.sum(-1, keepdim=True)
    return torch.where(total > 0, n * w / total.clamp_min(torch.finfo(raw.dtype).tiny), m)


def dpsw_weights(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, top_k: int = 32) -> Tensor:
    """Normalised DPSW weights w~ [B, T] (no gradient)."""
    return normalize_weights(dpsw_raw_weights(student_logits, teacher_logits, top_k), mask.bool())


def reduce_sequences(d: Tensor, w: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(per-sequence loss [B], valid-row mask [B]): (1/L_y) sum_t w~_t D_t; 0 for rows with no position."""
    mask = mask.bool()
    n = mask.sum(-1)
    per_seq = (w.to(d.dtype) * torch.where(mask, d, torch.zeros_like(d))).sum(-1) / n.clamp_min(1)
    return per_seq, n > 0


def mean_over_valid(per_seq: Tensor, valid: Tensor, student_logits: Tensor) -> Tensor:
    """Mean over sequences with at least one response position; 0 (graph kept) when there is none."""
    if not valid.any():
        return (student_logits.sum() * 0).to(per_seq.dtype)   # keeps the graph, contributes nothing
    return per_seq[valid].mean()


def msd_per_sequence(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, kind: str = "reverse_kl",
                     beta: float = 0.5, dpsw: bool = True, top_k: int = 32) -> tuple[Tensor, Tensor]:
    """(per-sequence loss [B], valid-row mask [B]), see :func:`reduce_sequences`."""
    mask = mask.bool()
    d = token_divergence(student_logits, teacher_logits, kind, beta)          # [B, T]
    w = dpsw_weights(student_logits, teacher_logits, mask, top_k) if dpsw else mask.to(d.dtype)
    return reduce_sequences(d, w, mask)


def msd_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, kind: str = "reverse_kl",
             beta: float = 0.5, dpsw: bool = True, top_k: int = 32) -> Tensor:
    """Mean over sequences with at least one response position; gradient reaches the student only."""
    per_seq, valid = msd_per_sequence(student_logits, teacher_logits, mask, kind, beta, dpsw, top_k)
    return mean_over_valid(per_seq, valid, student_logits)


def weighted_mean_over_valid(per_seq: Tensor, valid: Tensor, seq_weight: Tensor, student_logits: Tensor) -> Tensor:
    """sum_b c_b * loss_b / #valid over valid rows: ``seq_weight`` c [B] (e.g. ``benign_weight`` on benign
    rows, 1 elsewhere) scales a row's term without changing the denominator, so c = 1 everywhere is
    :func:`mean_over_valid` and c_b = 0 removes row b's gradient and nothing else."""
    if not valid.any():
        return (student_logits.sum() * 0).to(per_seq.dtype)
    c = seq_weight.to(per_seq.dtype)
    return (c[valid] * per_seq[valid]).sum() / valid.sum()
