"""The pairwise sigmoid losses (DPO `sigmoid`, Bradley-Terry) as one custom op whose forward also
computes each pair's derivatives (one Triton launch); backward only scales them."""

from typing import Optional

import torch
from torch import Tensor


@torch.library.custom_op("fastpref::pair_sigmoid", mutates_args=())
def pair_sigmoid_op(
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Optional[Tensor],
    ref_rejected: Optional[Tensor],
    margin: Optional[Tensor],
    scale: float,
    f_divergence: str,
    alpha: float,
    center_coef: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(B,) inputs -> per-pair losses −log σ(scale·(s_c − s_r) − margin) + center_coef·(x_c + x_r)²
    and their derivatives w.r.t. chosen and rejected, each (B,) fp32 (see kernels/pair_sigmoid.py)."""
    from fastpref.kernels.pair_sigmoid import pair_sigmoid

    return pair_sigmoid(
        chosen, rejected, ref_chosen, ref_rejected, margin,
        scale=scale, f_divergence=f_divergence, alpha=alpha, center_coef=center_coef,
    )  # fmt: skip


@pair_sigmoid_op.register_fake
def _(chosen, rejected, ref_chosen, ref_rejected, margin, scale, f_divergence, alpha, center_coef):
    like = chosen.new_empty(chosen.shape, dtype=torch.float32)
    return like, torch.empty_like(like), torch.empty_like(like)


def _setup_context(ctx, inputs, output):
    chosen, rejected = inputs[:2]
    ctx.save_for_backward(output[1], output[2])
    ctx.dtypes = chosen.dtype, rejected.dtype
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_losses, _grad_dc, _grad_dr):
    d_chosen, d_rejected = ctx.saved_tensors
    return (
        (grad_losses * d_chosen).to(ctx.dtypes[0]),
        (grad_losses * d_rejected).to(ctx.dtypes[1]),
        *(None,) * 7,
    )


torch.library.register_autograd("fastpref::pair_sigmoid", _backward, setup_context=_setup_context)
