"""The policy loss's backward in Triton: the gradient the token pass stored, times a scalar.

    scale_grad_(grad, scale) -> grad

The token pass (policy_loss_triton.py) stores d loss / d logp, divided by the global denominator
when the counts are numbers; the backward only multiplies it by grad_output (or grad_output / D),
in place. The scale is a 0-dim device tensor: no host sync, and a program that reads exactly 1
returns without touching a token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _policy_loss_scale_kernel(
    # in place: the gradient the token pass stored, like logp; scale [] (float32, float64 for
    # float64 logp)
    grad_ptr, scale_ptr,
    # shapes
    N,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """grad *= scale, BLOCK tokens per program; a program whose scale is exactly 1 does nothing.

    The product is formed in the scale's dtype and rounded once to the gradient's.
    """
    scale = tl.load(scale_ptr)
    if scale != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        keep = offs < N
        g = tl.load(grad_ptr + offs, mask=keep, other=0.0)
        tl.store(grad_ptr + offs, (g * scale).to(grad_ptr.dtype.element_ty), mask=keep)


def _block(n: int) -> int:
    """Tokens per program: 1024 (4 warps, 8 a thread), or the next power of two for tiny inputs
    (the token pass's blocks)."""
    return min(1024, triton.next_power_of_2(max(n, 16)))


def scale_grad_(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad (contiguous, the token pass's) *= scale (0-dim, on grad's device), in place; no host
    sync. Returns grad."""
    n = grad.numel()
    block = _block(n)
    _policy_loss_scale_kernel[(max(1, triton.cdiv(n, block)),)](grad, scale, n, BLOCK=block)
    return grad


# ------------------------------------------------------------------------------------------------
# Every input policy_loss's backward can hand the launcher, for the ahead-of-time compile check
# (benchmarks/compile_check.py): the gradient's dtype (logp's), the scale's (float32, float64 for
# float64 logp), tokens at the first of each block size and a multiple of 16.
LAUNCH_SPACE = {
    "dtype": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "tokens": (*tuple({_block(t): t for t in range(4096, 0, -1)}.values())[::-1], 4096),
}


def example_launch(dtype, tokens) -> None:
    """The launch of the backward at one point of LAUNCH_SPACE, on CPU tensors."""
    scale_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    scale_grad_(torch.zeros(tokens, dtype=dtype), torch.ones((), dtype=scale_dtype))
