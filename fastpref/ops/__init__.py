"""torch.autograd.Functions, one per fused op."""
