"""Triton kernels of papo_fast, each beside its plain-PyTorch reference (imported as papo_fast.kernels)."""
