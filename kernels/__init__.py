"""Fused Triton kernels for the hot ``stiefel_opt.functional`` operations (CUDA only)."""
