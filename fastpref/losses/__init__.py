"""Preference losses on per-sequence log-probs: pure torch, shared by the plain and the fused paths."""

from fastpref.losses.dpo import (
    F_DIVERGENCE_LOSS_TYPES,
    LOSS_TYPES,
    PreferenceOutput,
    check_dpo_inputs,
    check_dpo_options,
    dpo_loss,
    dpo_pair_losses,
    is_batch_coupled,
)
from fastpref.losses.kl import kl_penalty
from fastpref.losses.listwise import pro_loss, rrhf_loss
from fastpref.losses.reference_free import cpo_loss, orpo_loss, simpo_loss
from fastpref.losses.reward import bt_loss, check_bt_inputs
from fastpref.losses.weighting import ld_token_weights, wpo_weights

__all__ = [
    "F_DIVERGENCE_LOSS_TYPES",
    "LOSS_TYPES",
    "PreferenceOutput",
    "bt_loss",
    "check_bt_inputs",
    "check_dpo_inputs",
    "check_dpo_options",
    "cpo_loss",
    "dpo_loss",
    "dpo_pair_losses",
    "is_batch_coupled",
    "kl_penalty",
    "ld_token_weights",
    "orpo_loss",
    "pro_loss",
    "rrhf_loss",
    "simpo_loss",
    "wpo_weights",
]
