"""Old import path of :mod:`polyalign.models.batching` (moved in 0.1.1 so imports go one way); removed in 0.2."""

from polyalign.models.batching import (  # noqa: F401
    last_token_hidden,
    left_pad,
    length_buckets,
    response_batch,
    response_logits,
    trim_generation,
)
