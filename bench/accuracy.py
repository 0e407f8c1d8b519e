"""Error of a method's output and gradients against the high-precision reference.

Relative to the largest reference magnitude (max|x − x_ref| / max|x_ref|, per tensor, the worst
tensor reported): an element-wise relative error would be dominated by near-zero gradients, which
are most of a softmax's."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from fastpref.bench.workload import GradPiece


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual − expected| / max|expected|, computed in expected's dtype."""
    scale = expected.abs().max().item()
    return (actual.to(expected.dtype) - expected).abs().max().item() / (scale or 1.0)


def grad_error(grads: Mapping[str, torch.Tensor | None], reference: Iterable[GradPiece]) -> float:
    """Worst over the inputs of max|g − g_ref| / max|g_ref|; inf where a gradient is missing.
    `reference` yields (input name, index, reference values) pieces of each input's gradient."""
    diff: dict[str, float] = {}
    scale: dict[str, float] = {}
    for name, index, expected in reference:
        if grads[name] is None:
            return math.inf
        actual = grads[name][index].to(expected.dtype)
        diff[name] = max(diff.get(name, 0.0), (actual - expected).abs().max().item())
        scale[name] = max(scale.get(name, 0.0), expected.abs().max().item())
    return max(diff[name] / (scale[name] or 1.0) for name in diff)
