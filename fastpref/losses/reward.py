"""Bradley-Terry reward-model loss, as TRL 1.16.0's RewardTrainer.compute_loss (trl/trainer/reward_trainer.py)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from fastpref._checks import check_batch_vector, check_leading_batch, check_number, check_same_device


def check_bt_inputs(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | float | None,
    center_rewards_coefficient: float | None,
) -> None:
    """Validate the arguments of `bt_loss`; each error names the argument at fault."""
    batch = check_leading_batch("chosen_rewards", chosen_rewards)
    check_batch_vector("rejected_rewards", rejected_rewards, batch)
    if isinstance(margin, Tensor):
        check_batch_vector("margin", margin, batch)
    elif margin is not None:
        check_number("margin", margin)
    if center_rewards_coefficient is not None:
        check_number("center_rewards_coefficient", center_rewards_coefficient)
    check_same_device(
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        margin=margin if isinstance(margin, Tensor) else None,
    )


def bt_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    margin: Tensor | float | None = None,
    center_rewards_coefficient: float | None = None,
) -> Tensor:
    """Bradley-Terry loss: (B,), (B,) -> 0-dim.

    mean(-log s(r_c - r_r - margin)) + center_rewards_coefficient * mean((r_c + r_r)^2), where `margin`
    (a float or (B,)) is Llama 2's preference margin and the second term is Eisenstein et al.'s (2023)
    reward centring; each is left out when None.
    """
    check_bt_inputs(chosen_rewards, rejected_rewards, margin, center_rewards_coefficient)
    logits = chosen_rewards - rejected_rewards
    if margin is not None:
        logits = logits - margin
    loss = -F.logsigmoid(logits).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * ((chosen_rewards + rejected_rewards) ** 2).mean()
    return loss
