"""Every tolerance of the suite, in one place (DESIGN.md, Numerics)."""

import torch

# fastpref in this dtype vs the float64 reference: (rtol, atol).
VS_FP64 = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 2e-3),
}

# Slack on the comparative rule: a low-precision result may be worse than the textbook path's own
# error vs fp64 by at most this factor (plus the absolute floor below).
COMPARATIVE_FACTOR = 1.5
COMPARATIVE_FLOOR = 1e-6
