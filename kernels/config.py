"""Block configs of the kernels, in one place: fixed values, chosen for the GPU and for the
interpreter (which is fastest with few, large blocks).

GPU values come from the compile gate's counts (registers, no spills, SASS instructions per 1,024
elements: bench/results/kernels_compile.md), not yet from timings on a GPU: tune them with bench/.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import triton

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# Which block configs the launchers pick: the interpreter's, or the GPU's. The compile gate runs the
# library under the interpreter with the GPU's configs, to record what a GPU launch looks like.
interpreter_configs = INTERPRETING

# Elements of one (rows × columns) tile a row-kernel program holds per loop step: one row of a large
# vocabulary, or several rows of a small one, up to GPU_MULTI_ROW_TILE elements (each row adds a
# pointer per element, which costs registers: 4096 spills in the backward). 4 warps: on sm_90a the
# bf16 forward issues 209 warp instructions per 1,024 elements at 4096 columns and 4 warps (96
# registers), 244 with 8 warps, 214 at 8192 columns and 8 warps, 197 at 8192 and 4 warps but with 168
# registers; the backward 184 / 200 / 184 / 177 (56 registers).
GPU_TILE = 4096
GPU_TILE_WITH_STATS = 2048  # up to four per-lane sums instead of one: half the columns keeps them in registers
GPU_MULTI_ROW_TILE = 1024
INTERPRETER_TILE = 16384


@dataclass(frozen=True)
class RowConfig:
    """How the row kernels of token_logps split a (rows, V) problem."""

    block_v: int  # vocab columns per loop step
    block_rows: int  # token rows per program (several when the vocabulary is small)
    num_warps: int


def row_config(vocab_size: int, with_stats: bool = False) -> RowConfig:
    """The row kernels' config for a vocabulary of vocab_size columns."""
    if interpreter_configs:
        tile = multi_row_tile = INTERPRETER_TILE
    else:
        tile = GPU_TILE_WITH_STATS if with_stats else GPU_TILE
        multi_row_tile = GPU_MULTI_ROW_TILE
    block_v = min(tile, triton.next_power_of_2(vocab_size))
    return RowConfig(block_v, max(1, multi_row_tile // block_v), num_warps=4)
