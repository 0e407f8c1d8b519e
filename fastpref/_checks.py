"""Argument checks shared by the public functions: each error names the argument at fault."""

from __future__ import annotations

import math

import torch


def check_tensor(name: str, value, *, floating: bool | None = None, integer: bool = False) -> None:
    """Raise TypeError unless `value` is a tensor of the required kind."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if integer and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got dtype {value.dtype}")


def check_shape(name: str, value: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    """Raise ValueError unless `value.shape == shape`; `what` says where `shape` comes from."""
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({what}), got {tuple(value.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Raise ValueError when the given tensors (None skipped) are not all on one device."""
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on one device, got {where}")


def check_positive(name: str, value: float) -> None:
    """Raise ValueError unless `value` is a finite number > 0."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def check_choice(name: str, value, choices) -> None:
    """Raise ValueError unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


def check_number(name: str, value) -> None:
    """Raise TypeError unless `value` is a real Python number (bool excluded), ValueError unless finite."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def check_interval(name: str, value, low: float, high: float, *, closed_high: bool = False) -> None:
    """Raise unless `value` is a number in [low, high) (or [low, high] with closed_high)."""
    check_number(name, value)
    inside = low <= value <= high if closed_high else low <= value < high
    if not inside:
        bracket = "]" if closed_high else ")"
        raise ValueError(f"{name} must lie in [{low}, {high}{bracket}, got {value}")


def check_batch_vector(name: str, value, batch: int, *, floating: bool = True) -> None:
    """Raise unless `value` is a (batch,) tensor: floating-point, or any real dtype if not `floating`."""
    check_tensor(name, value, floating=floating)
    if not floating and (value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{name} must be a real-valued tensor, got dtype {value.dtype}")
    check_shape(name, value, (batch,), "one value per pair")


def check_leading_batch(name: str, value, *, listwise: bool = False) -> int:
    """Raise unless `value` is a floating (B,) tensor, or (B, K) with K >= 2 if `listwise`, with B >= 1;
    return B."""
    check_tensor(name, value, floating=True)
    ndim, min_last = (2, 2) if listwise else (1, 1)
    if value.dim() != ndim or value.shape[0] == 0 or value.shape[-1] < min_last:
        wanted = "(B, K) with B >= 1, K >= 2" if listwise else "(B,) with B >= 1"
        raise ValueError(f"{name} must have shape {wanted}, got {tuple(value.shape)}")
    return value.shape[0]


def check_count(name: str, value, *, minimum: int = 0, allow_tensor: bool = False) -> None:
    """Raise unless `value` is a Python int >= minimum (bool excluded), or, if `allow_tensor`, a 0-dim
    real (integer or floating, not bool) tensor; a tensor's value is not read (no device sync)."""
    if allow_tensor and isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name} must be an int or a 0-dim tensor, got shape {tuple(value.shape)}")
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real-valued tensor, got dtype {value.dtype}")
        return
    if not isinstance(value, int) or isinstance(value, bool):
        kinds = "an int or a 0-dim tensor" if allow_tensor else "an int"
        raise TypeError(f"{name} must be {kinds}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
