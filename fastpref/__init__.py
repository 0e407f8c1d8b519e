"""fastpref: log-probs and preference losses from a language model's head, without tokens x vocab
tensors. The public API (DESIGN.md) is re-exported here."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _installed_version

from fastpref.api import (
    TokenStats,
    bt_loss,
    dpo_loss,
    linear_dpo_loss,
    linear_sequence_logps,
    linear_token_logps,
    masked_mean,
    masked_sum,
    sequence_logps,
    token_logps,
)
from fastpref.losses import (
    LOSS_TYPES,
    PreferenceOutput,
    cpo_loss,
    kl_penalty,
    ld_token_weights,
    orpo_loss,
    pro_loss,
    rrhf_loss,
    simpo_loss,
    wpo_weights,
)

try:
    __version__ = _installed_version("fastpref")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "LOSS_TYPES",
    "PreferenceOutput",
    "TokenStats",
    "bt_loss",
    "cpo_loss",
    "dpo_loss",
    "kl_penalty",
    "ld_token_weights",
    "linear_dpo_loss",
    "linear_sequence_logps",
    "linear_token_logps",
    "masked_mean",
    "masked_sum",
    "orpo_loss",
    "pro_loss",
    "rrhf_loss",
    "simpo_loss",
    "sequence_logps",
    "token_logps",
    "wpo_weights",
]
