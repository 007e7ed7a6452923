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

:func:`fused_token_divergence` starts one step earlier, from the final hidden states and the LM head,
so that not even the [N, V] logits exist: see its docstring.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

KINDS = ("reverse_kl", "forward_kl", "jsd")
CHUNK_ROWS = 256     # rows of [chunk, V] live at once: 256 x 151,936 x 4 B = 155 MB per temporary
WEIGHT_FLOOR = 1e-6  # teacher weights below this are rounding noise (1 - H/log K of a uniform top-K)


def _check_kind(kind: str, beta: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "jsd" and not 0 < beta < 1:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _divergence_rows(s: Tensor, t: Tensor, kind: str, beta: float, want_grad: bool):
    """Rows of logits [n, V] -> (D [n], dD/ds [n, V] or None)."""
    ls, lt = _log_probs(s), _log_probs(t)
    return _divergence_from_log_probs(ls, lt, kind, beta, want_grad)


def _log_probs(x: Tensor) -> Tensor:
    """log-softmax over the vocabulary in fp32 (at least): what the divergence and DPSW both read."""
    return torch.log_softmax(x.to(_compute_dtype(x)), -1)


def _divergence_from_log_probs(ls: Tensor, lt: Tensor, kind: str, beta: float, want_grad: bool):
    """Log-probabilities [n, V] of student and teacher -> (D [n], dD/ds [n, V] or None)."""
    ps = ls.exp()
    if kind == "reverse_kl":
        g = (ls - lt).mul_(ps)                               # p_S,i (log p_S,i - log p_T,i): one buffer
        d = g.sum(-1)
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
        grad = g.addcmul_(ps, d[:, None], value=-1)          # p_S (g - D): sum_i p_S,i g_i is D; in place
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
    _check_kind(kind, beta)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} differ")
    lead, V = student_logits.shape[:-1], student_logits.shape[-1]
    d = _ChunkedDivergence.apply(student_logits.reshape(-1, V), teacher_logits.detach().reshape(-1, V),
                                 kind, beta, CHUNK_ROWS)
    return d.reshape(lead)


def _dpsw_rows(t: Tensor, ls: Tensor, k: int) -> Tensor:
    """Teacher logits and student log-probabilities, rows [n, V] -> raw DPSW weights [n], K = k <= V
    (see :func:`dpsw_raw_weights`). The student's side reads the log-softmax the divergence needs
    anyway; the teacher's top-K is taken from its logits as they are (no full-width copy)."""
    top_logits, top_idx = t.topk(k, dim=-1)                  # [n, k]; top_idx[:, 0] = y*
    lp = torch.log_softmax(top_logits.to(ls.dtype), -1)      # renormalised top-K
    entropy = -(lp.exp() * lp).sum(-1)
    w_t = 1 - entropy / math.log(k) if k > 1 else torch.ones_like(entropy)
    w_t = torch.where(w_t < WEIGHT_FLOOR, torch.zeros_like(w_t), w_t)  # rounding noise of a uniform top-K
    p_star = ls.gather(-1, top_idx[:, :1]).squeeze(-1).exp()           # p_S(y*)
    return w_t * (1 - p_star)


@torch.no_grad()
def dpsw_raw_weights(student_logits: Tensor, teacher_logits: Tensor, top_k: int = 32) -> Tensor:
    """w_t = w^T_t * w^S_t before normalisation, [..., V] -> [...].

    w^T = 1 - H(teacher's top-K renormalised) / log K (a confident teacher counts more);
    w^S = 1 - p_S(y*_t), y* = teacher argmax (positions the student gets wrong count more).
    """
    V = student_logits.shape[-1]
    out = torch.empty(student_logits.shape[:-1], device=student_logits.device,
                      dtype=_compute_dtype(student_logits)).reshape(-1)
    s2, t2 = student_logits.reshape(-1, V), teacher_logits.reshape(-1, V)
    for i in range(0, s2.shape[0], CHUNK_ROWS):
        out[i:i + CHUNK_ROWS] = _dpsw_rows(t2[i:i + CHUNK_ROWS], _log_probs(s2[i:i + CHUNK_ROWS]), min(top_k, V))
    return out.reshape(student_logits.shape[:-1])


class _FusedDivergence(torch.autograd.Function):
    """LM head + divergence + DPSW weights, chunk by chunk over rows; see :func:`fused_token_divergence`."""

    @staticmethod
    def forward(ctx, h_s, h_t, weight, bias, t_weight, t_bias, kind, beta, k, chunk):   # h: [N, H], weight: [V, H]
        recompute = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]    # the head itself is trained
        grad_h = torch.empty_like(h_s) if ctx.needs_input_grad[0] and not recompute else None
        d = torch.empty(h_s.shape[0], dtype=_compute_dtype(h_s), device=h_s.device)
        raw = torch.empty_like(d)
        for i in range(0, h_s.shape[0], chunk):
            # Each [n, V] temporary is dropped as soon as nothing reads it (and before the next chunk
            # allocates its own): the step's peak memory is this loop's, a few [n, V] buffers.
            ls = _log_probs(torch.nn.functional.linear(h_s[i:i + chunk], weight, bias))  # fp32 (at least)
            t = torch.nn.functional.linear(h_t[i:i + chunk], t_weight, t_bias)         # [n, V], the model's dtype
            lt = _log_probs(t)
            d[i:i + chunk], g = _divergence_from_log_probs(ls, lt, kind, beta, grad_h is not None)
            del lt
            raw[i:i + chunk] = _dpsw_rows(t, ls, k)
            del t, ls
            if grad_h is not None:
                grad_h[i:i + chunk] = g.to(weight.dtype) @ weight                     # dD/dh = dD/ds @ W, [n, H]
            del g
        ctx.mark_non_differentiable(raw)
        ctx.args = (kind, beta, chunk, recompute)
        ctx.save_for_backward(*((h_s, h_t, weight, bias, t_weight, t_bias) if recompute else (grad_h,)))
        return d, raw

    @staticmethod
    def backward(ctx, grad_d, _grad_raw):
        kind, beta, chunk, recompute = ctx.args
        none = (None,) * 8
        if not recompute:
            (grad_h,) = ctx.saved_tensors
            return (None if grad_h is None else (grad_h * grad_d[:, None]).to(grad_h.dtype)), *none, None
        h_s, h_t, weight, bias, t_weight, t_bias = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        grad_h = torch.empty_like(h_s) if need_h else None
        acc = _compute_dtype(weight)                      # the [V, H] sum over chunks accumulates in fp32
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        for i in range(0, h_s.shape[0], chunk):           # second pass: logits and dD/ds again, per chunk
            s = torch.nn.functional.linear(h_s[i:i + chunk], weight, bias)
            t = torch.nn.functional.linear(h_t[i:i + chunk], t_weight, t_bias)
            _, g = _divergence_rows(s, t, kind, beta, True)
            del s, t
            g = (g * grad_d[i:i + chunk, None].to(g.dtype)).to(weight.dtype)          # dL/ds, [n, V]
            if need_h:
                grad_h[i:i + chunk] = g @ weight
            if need_w:
                grad_w += g.T @ h_s[i:i + chunk]
            if need_b:
                grad_b += g.sum(0)
            del g
        return (grad_h, None, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), *none[:6])


def fused_token_divergence(h_student: Tensor, h_teacher: Tensor, weight: Tensor, bias: Tensor | None = None,
                           kind: str = "reverse_kl", beta: float = 0.5, top_k: int = 32,
                           teacher_weight: Tensor | None = None, teacher_bias: Tensor | None = None,
                           chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """(D [...], raw DPSW weights [...]) from final hidden states, with the LM head fused in.

    Equals ``token_divergence(s, t, kind, beta)`` and ``dpsw_raw_weights(s, t, top_k)`` for the logits
    s = h_student @ weight^T + bias and t = h_teacher @ teacher_weight^T + teacher_bias (teacher head
    defaults to the student's: LoRA's adapter-disabled teacher), but the logits exist only ``chunk``
    rows (default CHUNK_ROWS) at a time. Each chunk computes the logits in the model's dtype (as the
    model's own head does), D and the DPSW weights in fp32 (at least) and, when h_student requires
    grad, dD/dh = (dD/ds) @ weight, [n, H]. That [N, H] gradient is the one tensor saved for
    backward, which multiplies it by the incoming gradient: memory O(N H + chunk V), not O(N V).

    When ``weight`` or ``bias`` requires grad (full fine-tuning of an untied head, or of tied
    embeddings), the forward saves the inputs instead and backward recomputes each chunk's logits
    and dD/ds to give the gradients w.r.t. h_student, weight and bias (six [N, H] x [H, V] matmuls in
    all, against four unfused); the [V, H] weight gradient accumulates over chunks in fp32.
    The teacher side gets no gradient. The raw weights are constants (no gradient), as in DPSW.

    Args:
        h_student, h_teacher: [..., H] post-norm final hidden states (what the LM head consumes).
        weight: [V, H] LM head weight (``model.get_output_embeddings().weight``); bias: [V] or None.
        kind, beta: as in :func:`token_divergence`.  top_k: K of :func:`dpsw_raw_weights`.
        teacher_weight, teacher_bias: the frozen teacher's head when it differs (a reference copy).
    """
    _check_kind(kind, beta)
    if h_student.shape != h_teacher.shape or weight.dim() != 2 or weight.shape[1] != h_student.shape[-1]:
        raise ValueError(f"need h_student = h_teacher [..., H] and weight [V, H], got {tuple(h_student.shape)}, "
                         f"{tuple(h_teacher.shape)}, {tuple(weight.shape)}")
    if teacher_weight is None:
        teacher_weight, teacher_bias = weight, bias
    if teacher_weight.shape != weight.shape:
        raise ValueError(f"teacher head {tuple(teacher_weight.shape)} differs from {tuple(weight.shape)}")
    lead, H = h_student.shape[:-1], h_student.shape[-1]
    t_bias = None if teacher_bias is None else teacher_bias.detach()
    d, raw = _FusedDivergence.apply(h_student.reshape(-1, H), h_teacher.detach().reshape(-1, H), weight, bias,
                                    teacher_weight.detach(), t_bias, kind, beta, min(top_k, weight.shape[0]),
                                    chunk or CHUNK_ROWS)
    return d.reshape(lead), raw.reshape(lead)


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
    """Mean over sequences with at least one response position; 0 (graph kept) when there is none.
    ``student_logits`` is any student tensor in the graph (the hidden states on the fused path)."""
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
