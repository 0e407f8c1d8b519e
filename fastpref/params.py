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


# Names of the optional per-token statistics, in the order the ops return them (TRL's names).
STAT_NAMES = ("entropy", "is_top1", "mean_logit", "log_sum_sq_probs")
