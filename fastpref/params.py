"""The non-tensor options of a log-prob op, as one frozen value (the ops take its fields as scalars)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeadParams:
    """How raw logits become log-probs, and how large a logits tile may be: z <- logit_scale*raw, then
    z <- softcap*tanh(z/softcap), then z <- z/temperature; positions whose label equals ignore_index
    get log-prob 0 and no gradient."""

    ignore_index: int = -100
    temperature: float = 1.0
    softcap: float | None = None
    tile_bytes: int | None = None  # bytes of one fp32 logits tile; None: the backend's default
    logit_scale: float = 1.0  # multiplies the raw logits before the softcap (Cohere, Granite, Falcon-H1)


# Names of the optional per-token statistics, in the order the ops return them (TRL's names). The ops
# take a selector, a bitmask with bit i for STAT_NAMES[i], and return the selected ones only, stacked
# (k, ...) in this order: a statistic that is not selected is neither computed nor stored.
STAT_NAMES = ("entropy", "is_top1", "mean_logit", "log_sum_sq_probs")
ENTROPY, IS_TOP1, MEAN_LOGIT, LOG_SUM_SQ_PROBS = (1 << i for i in range(len(STAT_NAMES)))
ALL_STATS = (1 << len(STAT_NAMES)) - 1


def selected(stats: int) -> tuple[str, ...]:
    """The names a selector selects, in STAT_NAMES order (the rows of the ops' stats output)."""
    return tuple(name for i, name in enumerate(STAT_NAMES) if stats >> i & 1)


def stat_row(stats: int, stat: int) -> int:
    """The row of `stat` (one bit) in the (k, ...) stats output of selector `stats`, which selects it."""
    return bin(stats & (stat - 1)).count("1")
