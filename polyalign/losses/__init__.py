"""Pure loss functions: tensors in, tensor out (no model, no logging)."""

from polyalign.losses.mlc import (
    MLCHead,
    mean_pairwise_cosine,
    mlc_loss,
    mlc_loss_per_example,
    top_singular_share,
)
from polyalign.losses.msd import dpsw_raw_weights, dpsw_weights, msd_loss, msd_per_sequence, token_divergence

__all__ = [
    "MLCHead", "dpsw_raw_weights", "dpsw_weights", "mean_pairwise_cosine", "mlc_loss", "mlc_loss_per_example",
    "msd_loss", "msd_per_sequence", "token_divergence", "top_singular_share",
]
