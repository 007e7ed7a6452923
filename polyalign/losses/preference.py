"""Reference-free preference losses: SimPO and ORPO.

Stable TRL ships DPO but keeps SimPO (CPO) and ORPO in ``trl.experimental``; MLC must plug into
both, so the two losses live here as short functions of per-sequence log-probabilities.

Inputs are the summed log-probabilities of each chosen / rejected response and their token
counts; both losses use the length-normalised (mean per-token) log-probability, as in the
papers and LLaMA-Factory (the stack the official MLC code runs on).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_len: torch.Tensor,
               rejected_len: torch.Tensor, beta: float = 2.0, gamma: float = 0.5) -> torch.Tensor:
    """SimPO (Meng et al., 2024): ``-log sigmoid(beta * (mean_logp_w - mean_logp_l) - gamma)``, batch mean.

    ``gamma`` is the target reward margin (in reward units, i.e. already multiplied by beta).
    """
    margin = chosen_logps / chosen_len.clamp(min=1) - rejected_logps / rejected_len.clamp(min=1)
    return -F.logsigmoid(beta * margin - gamma).mean()


def log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends (Maechler, 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_len: torch.Tensor,
              rejected_len: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """ORPO (Hong et al., 2024): ``NLL(chosen) + beta * -log sigmoid(log odds_w - log odds_l)``, batch mean.

    ``odds(y) = p / (1 - p)`` with ``p`` the mean per-token probability ``exp(mean logp)``; the NLL
    is the chosen response's mean per-token negative log-likelihood.
    """
    mean_w = chosen_logps / chosen_len.clamp(min=1)
    mean_l = rejected_logps / rejected_len.clamp(min=1)
    # Clamp below 0 so a response of probability ~1 gives a large finite log-odds, not inf.
    mean_w, mean_l = mean_w.clamp(max=-1e-6), mean_l.clamp(max=-1e-6)
    log_odds = (mean_w - log1m_exp(mean_w)) - (mean_l - log1m_exp(mean_l))
    return (-mean_w - beta * F.logsigmoid(log_odds)).mean()
