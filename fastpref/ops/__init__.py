"""The fused ops as torch.library custom ops, with fake implementations and autograd formulas: one module each."""
