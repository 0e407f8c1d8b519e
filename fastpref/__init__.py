"""fastpref: log-probs and preference losses from a language model's head, without tokens x vocab
tensors. The public API (DESIGN.md) is re-exported here."""

from fastpref.api import (
    TokenStats,
    linear_sequence_logps,
    linear_token_logps,
    masked_mean,
    masked_sum,
    sequence_logps,
    token_logps,
)

__all__ = [
    "TokenStats",
    "linear_sequence_logps",
    "linear_token_logps",
    "masked_mean",
    "masked_sum",
    "sequence_logps",
    "token_logps",
]
