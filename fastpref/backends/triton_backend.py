"""Triton backend: the logits path runs the kernels of `fastpref.kernels.token_logps`; the linear
path (hidden x lm_head) still runs the chunked PyTorch code on the same device (cuBLAS GEMMs).
float64 inputs (gradcheck, references) also run the chunked PyTorch code: the kernels are fp32."""

import torch

from fastpref.backends import torch_chunked
from fastpref.backends.torch_chunked import linear_backward, linear_forward, linear_rows_fused
from fastpref.kernels import token_logps as kernels
from fastpref.params import HeadParams

__all__ = ["linear_backward", "linear_forward", "linear_rows_fused", "logits_backward", "logits_forward"]


def logits_forward(logits, labels, params: HeadParams, with_stats: bool):
    backend = torch_chunked if logits.dtype == torch.float64 else kernels
    return backend.logits_forward(logits, labels, params, with_stats)


def logits_backward(logits, labels, lse, grad_logps, params: HeadParams, in_place: bool = False):
    backend = torch_chunked if logits.dtype == torch.float64 else kernels
    return backend.logits_backward(logits, labels, lse, grad_logps, params, in_place)
