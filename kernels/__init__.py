"""Triton kernels, each beside its plain-PyTorch path (installed as papo_fast.kernels)."""
