"""Triton kernels and their launchers, imported as `fastpref.kernels` (CUDA; CPU under TRITON_INTERPRET=1)."""
