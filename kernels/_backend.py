"""Backend dispatch, the input checks every op shares, and two small helpers of the op files.

Dispatch rule (docs/design.md, "Dispatch"): CUDA tensors run the Triton kernels, CPU tensors the
PyTorch path; ``backend="triton"`` or ``backend="torch"`` forces one. Triton on CPU tensors works
only under the interpreter (``TRITON_INTERPRET=1`` set before triton is imported), which is how the
tests check every kernel on a machine without a GPU.
"""

from __future__ import annotations

import inspect
import math
import os

import torch
import triton.language as tl

BACKENDS = ("auto", "torch", "triton")


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, *tensors: torch.Tensor | None) -> str:
    """Pick "torch" or "triton" for ``tensors``; raise a ValueError that says why not."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    present = [t for t in tensors if t is not None]
    devices = {t.device for t in present}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    on_cuda = bool(present) and present[0].is_cuda
    if backend == "auto":
        return "triton" if on_cuda else "torch"
    if backend == "triton" and not on_cuda and not triton_interpreting():
        raise ValueError(
            "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
            "imported to run the kernels in Triton's CPU interpreter"
        )
    return backend


def check_vector(name: str, t: torch.Tensor, n: int | None = None) -> None:
    """A 1-D tensor, of length ``n`` when given."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if n is not None and t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} elements, expected {n} (one per response)")


FLOAT32_MAX = torch.finfo(torch.float32).max


def beyond_float32(t: torch.Tensor) -> torch.Tensor:
    """Like ``t``, bool: NaN, inf, or a magnitude float32 cannot hold. No host sync."""
    return ~(t.abs() <= FLOAT32_MAX)


def bad_values_error(name: str, t: torch.Tensor, bad: torch.Tensor) -> ValueError:
    """The error for the ``bad`` values of ``t``: how many, and the first one's index and value
    (the error path: it syncs)."""
    idx = tuple(int(i) for i in bad.nonzero()[0])
    where = idx[0] if len(idx) == 1 else idx
    value = t[idx].item()
    what = "non-finite" if not math.isfinite(value) else f"beyond float32's {FLOAT32_MAX:.4g}"
    return ValueError(
        f"{name} has {int(bad.sum())} {what} value(s); first at index {where}: {value!r}"
    )


def check_float(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The math and accumulator dtype of the ops: fp32 for bf16 / fp16 / fp32 inputs, and float64
    for float64 inputs (so that gradcheck runs)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class Slot(int, tl.constexpr):
    """A named position in a stats vector: an int to Python (it indexes tensors) and a
    tl.constexpr to Triton, whose kernels read a module constant only when it is one. So a kernel,
    the PyTorch path and the finalization all use the same names, defined once."""


def none_grads(forward, differentiable: int = 1) -> tuple[None, ...]:
    """The None gradients an autograd.Function's backward returns for the inputs of ``forward``
    after its first ``differentiable`` ones, counted from its signature (ctx excluded)."""
    return (None,) * (len(inspect.signature(forward).parameters) - 1 - differentiable)


def at_offset(t: torch.Tensor, aligned: bool) -> torch.Tensor:
    """t, or a copy of it starting one element past a 16-byte boundary, as a caller's slice may
    (Triton specializes a kernel on whether each pointer is 16-byte aligned)."""
    return t if aligned else torch.empty(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape).copy_(t)
