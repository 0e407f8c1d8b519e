"""Block configs of the kernels, in one place: fixed values, chosen for the GPU and for the
interpreter (which is fastest with few, large blocks).

Not yet measured on a GPU: the values below are the starting point to tune with bench/.
"""

from __future__ import annotations

import os

import triton

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# Which block configs the launchers pick: the interpreter's, or the GPU's. The compile gate runs the
# library under the interpreter with the GPU's configs, to record what a GPU launch looks like.
interpreter_configs = INTERPRETING


def block_v_for(vocab_size: int) -> int:
    """Vocab columns one program handles per loop step."""
    return min(16384 if interpreter_configs else 4096, triton.next_power_of_2(vocab_size))
