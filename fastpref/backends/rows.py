"""Which token rows a call computes, and the label check that rides along.

The heads compute valid rows only (label != ignore_index), gathered into a compact list: finding how
many there are is a call's one device-to-host copy, and that same copy carries the count of labels
outside [0, V), so checking them costs no second sync. The positions themselves come from a stable
sort of the validity mask (no sync, any torch >= 2.2), not from `nonzero`, which syncs again, and
are unravelled by integer division with the shape's Python ints (`torch.unravel_index` copies the
shape to the device: a blocking copy, forbidden under capture). An op's forward hands its positions
to its backward, which therefore syncs not at all.

Under CUDA-graph capture no copy is allowed: every position is computed (the Triton kernels give
ignored rows log-prob 0 and no gradient) and labels are not checked; an out-of-range label then
yields a meaningless (finite) value for that token, as it does under any kernel that cannot raise.
"""

from __future__ import annotations

import torch


def capturing(t: torch.Tensor) -> bool:
    """Whether the current stream of t's device is being captured into a CUDA graph (no host syncs
    allowed); t's device, not the current one, where a head sits on another GPU."""
    if not t.is_cuda:
        return False
    with torch.cuda.device(t.device):
        return torch.cuda.is_current_stream_capturing()


def out_of_range(labels: torch.Tensor, ignore_index: int, vocab_size: int) -> torch.Tensor:
    """Bool mask of the labels that are neither ignore_index nor in [0, vocab_size)."""
    return (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))


def raise_out_of_range(labels: torch.Tensor, ignore_index: int, vocab_size: int) -> None:
    """The error for labels outside [0, vocab_size) (the error path may sync again)."""
    bad = labels[out_of_range(labels, ignore_index, vocab_size)][0].item()
    raise ValueError(f"labels must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}, found {bad}")


def check_labels(labels: torch.Tensor, ignore_index: int, vocab_size: int) -> None:
    """Raise ValueError for labels outside [0, vocab_size): one sync, none under graph capture."""
    if not capturing(labels) and out_of_range(labels, ignore_index, vocab_size).any():
        raise_out_of_range(labels, ignore_index, vocab_size)


def unravel(flat: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, ...]:
    """Index tuple of the flat (row-major) indices into shape: device arithmetic on Python ints (as
    torch.unravel_index, which copies the shape to the device); () for a 0-d shape."""
    if not shape:
        return ()
    index = []
    for size in reversed(shape[1:]):
        index.append(flat % size)
        flat = flat // size
    return (flat, *reversed(index))


def positions(mask: torch.Tensor, count: int) -> tuple[torch.Tensor, ...]:
    """Index tuple of the `count` True entries of mask, in order, without a host sync."""
    flat = torch.argsort(mask.flatten().to(torch.uint8), descending=True, stable=True)[:count]
    return unravel(flat, mask.shape)


def all_positions(shape: torch.Size, device) -> tuple[torch.Tensor, ...]:
    """Index tuple of every position of a tensor of `shape`."""
    return unravel(torch.arange(shape.numel(), device=device), shape)


def valid_rows(
    labels: torch.Tensor, ignore_index: int, vocab_size: int, n_valid: int | None = None
) -> tuple[torch.Tensor, ...]:
    """Index tuple of the positions to compute: the valid ones (checking the labels on the way: the
    one sync), or every position under CUDA-graph capture. n_valid: the count, when the caller
    already has it on the host and has checked the labels (no sync)."""
    if capturing(labels):
        return all_positions(labels.shape, labels.device)
    valid = labels != ignore_index
    if n_valid is None:
        n_valid, n_bad = torch.stack([valid.sum(), out_of_range(labels, ignore_index, vocab_size).sum()]).tolist()
        if n_bad:
            raise_out_of_range(labels, ignore_index, vocab_size)
    return positions(valid, n_valid)
