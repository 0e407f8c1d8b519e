"""Block configs of the kernels, in one place: fixed values, chosen for the GPU and for the
interpreter (which is fastest with few, large blocks).

Not yet measured on a GPU: the values below are the starting point to tune with bench/.
"""

from __future__ import annotations

import os

import triton

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
MAX_BLOCK_V = 16384 if INTERPRETING else 4096


def block_v_for(vocab_size: int) -> int:
    """Vocab columns one program handles per loop step."""
    return min(MAX_BLOCK_V, triton.next_power_of_2(vocab_size))
