"""Triton kernels of ``logits_policy_loss``: token log-probs from a logits tensor, and their
gradient back into a logits-shaped buffer.

    fwd  lse = logsumexp(z / T), logp = z[target] / T - lse     one read of each valid row
    bwd  grad_z = coef * (onehot(target) - exp(z / T - lse))     coef = dL/dlogp / T; one read and
                                                                 one write of each row

Each row is read in BLOCK_V-wide chunks of the vocabulary with an online logsumexp (running max
and rescaled sum), in float32 (float64 for float64 logits), never as a float32 copy of the row.
The gradient is written in the logits' own dtype.

1. **Grid-safe.** A launch has ``launch_grid(rows)`` = min(rows, MAX_PROGRAMS) programs on grid
   dimension 0, each striding over the rows (row = program, program + programs, ...). MAX_PROGRAMS
   is CUDA's smallest per-dimension grid limit (65,535), so no token count overflows a grid
   dimension; past it, more programs would only queue behind the ones already resident.
2. **Padding is skipped.** In the padded layout a row whose mask is 0 is not read: the forward
   stores logp = lse = 0 and no flags, the backward writes a zero row (padding logits may hold
   anything, NaN included; a padding target may be any id, e.g. -100).
3. **Flags in the same pass.** The forward counts the non-finite logits of each valid row and
   flags a target outside [0, V) (its logit is then not read: logp is NaN), so the caller checks
   both with one host read.
4. **Temperature is a runtime float**, not a constexpr: a new value does not recompile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# CUDA's limit on grid dimensions 1 and 2 (dimension 0 goes to 2^31 - 1): the cap of every launch.
MAX_PROGRAMS = 65_535


def _block_v(args) -> int:
    return min(4096, triton.next_power_of_2(args["n_vocab"]))


@triton.heuristics({"BLOCK_V": _block_v})
@triton.jit
def _logits_logp_fwd_kernel(
    # data: logits [rows, V] (any float dtype), targets [rows] int, valid [rows] uint8 (HAS_MASK)
    logits_ptr,
    targets_ptr,
    valid_ptr,
    # out: logp, lse [rows] (fp32; fp64 for fp64 logits), nonfinite, bad_target [rows] int32
    logp_ptr,
    lse_ptr,
    nonfinite_ptr,
    bad_target_ptr,
    # shapes and strides: row r is token r % seq_len of sequence r // seq_len
    n_rows,
    n_vocab,
    seq_len,
    stride_seq,
    stride_tok,
    # constants
    temperature,
    # switches and block sizes
    HAS_MASK: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    acc = lse_ptr.dtype.element_ty
    first = tl.program_id(0).to(tl.int64)  # rows x V passes 2^31: int64 row offsets
    step = tl.num_programs(0).to(tl.int64)
    for row in tl.range(first, n_rows, step):
        valid = True
        if HAS_MASK:
            valid = tl.load(valid_ptr + row) != 0
        if valid:
            row_ptr = logits_ptr + (row // seq_len) * stride_seq + (row % seq_len) * stride_tok
            m = tl.full([], float("-inf"), acc)  # running max
            s = tl.full([], 0.0, acc)  # running sum of exp(z - m)
            bad = tl.zeros([], tl.int32)  # non-finite logits in the row
            for start in range(0, n_vocab, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                ok = cols < n_vocab
                x = tl.load(row_ptr + cols, mask=ok, other=float("-inf")).to(acc)
                bad += tl.sum((ok & ~(tl.abs(x) < float("inf"))).to(tl.int32), axis=0)
                z = x / temperature
                m_new = tl.maximum(m, tl.max(z, axis=0))  # finite: a block has a valid column
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
                m = m_new
            lse = m + tl.log(s)
            target = tl.load(targets_ptr + row).to(tl.int64)
            in_range = (target >= 0) & (target < n_vocab)
            x_t = tl.load(row_ptr + target, mask=in_range, other=float("nan")).to(acc)
            tl.store(logp_ptr + row, x_t / temperature - lse)
            tl.store(lse_ptr + row, lse)
            tl.store(nonfinite_ptr + row, bad)
            tl.store(bad_target_ptr + row, (~in_range).to(tl.int32))
        else:
            tl.store(logp_ptr + row, tl.zeros([], acc))
            tl.store(lse_ptr + row, tl.zeros([], acc))
            tl.store(nonfinite_ptr + row, tl.zeros([], tl.int32))
            tl.store(bad_target_ptr + row, tl.zeros([], tl.int32))


@triton.heuristics({"BLOCK_V": _block_v})
@triton.jit
def _logits_logp_bwd_kernel(
    # data: logits [rows, V], targets [rows], valid [rows] uint8 (HAS_MASK), lse, coef [rows]
    logits_ptr,
    targets_ptr,
    valid_ptr,
    lse_ptr,
    coef_ptr,
    # out: grad [rows, V] in the logits' dtype
    grad_ptr,
    # shapes and strides: logits' row r is token r % seq_len of sequence r // seq_len
    n_rows,
    n_vocab,
    seq_len,
    stride_seq,
    stride_tok,
    stride_grad_row,
    # constants
    temperature,
    # switches and block sizes
    HAS_MASK: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    acc = lse_ptr.dtype.element_ty
    out_ty = grad_ptr.dtype.element_ty
    first = tl.program_id(0).to(tl.int64)
    step = tl.num_programs(0).to(tl.int64)
    for row in tl.range(first, n_rows, step):
        valid = True
        if HAS_MASK:
            valid = tl.load(valid_ptr + row) != 0
        grad_row = grad_ptr + row * stride_grad_row
        if valid:
            row_ptr = logits_ptr + (row // seq_len) * stride_seq + (row % seq_len) * stride_tok
            lse = tl.load(lse_ptr + row)
            coef = tl.load(coef_ptr + row)  # dL/dlogp / temperature
            target = tl.load(targets_ptr + row).to(tl.int64)
            for start in range(0, n_vocab, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                ok = cols < n_vocab
                z = tl.load(row_ptr + cols, mask=ok, other=0.0).to(acc) / temperature
                onehot = tl.where(cols == target, 1.0, 0.0).to(acc)
                g = coef * (onehot - tl.exp(z - lse))
                tl.store(grad_row + cols, g.to(out_ty), mask=ok)
        else:
            for start in range(0, n_vocab, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                tl.store(grad_row + cols, tl.zeros([BLOCK_V], out_ty), mask=cols < n_vocab)


def launch_grid(n_rows: int) -> tuple[int]:
    """min(rows, MAX_PROGRAMS) programs on grid dimension 0, each striding over the rows."""
    return (max(1, min(n_rows, MAX_PROGRAMS)),)


def _num_warps(n_vocab: int) -> int:
    """8 warps for a 4096-wide block (16 values a thread), fewer for a small vocabulary."""
    return max(1, min(8, _block_v({"n_vocab": n_vocab}) // 512))


# Bytes per call, N valid rows of V logits of b bytes: the forward reads N*V*b (~6 FLOPs/elem);
# the backward reads N*V*b and writes rows*V*b (padding rows are written as zeros, ~6 FLOPs/elem).
# Both are memory-bound: at V = 152k in bf16 a row is 304 kB, against 4 + 8 bytes of [rows] data.


def row_layout(logits: torch.Tensor) -> tuple[int, int, int]:
    """(seq_len, stride_seq, stride_tok) of the token rows of [B, L, V] or [T, V] logits, whose
    vocabulary dimension has unit stride: a sliced view such as logits[:, :-1] is read in place."""
    if logits.dim() == 3:
        return max(1, logits.shape[1]), logits.stride(0), logits.stride(1)
    return max(1, logits.shape[0]), 0, logits.stride(0)


def logprobs_triton(logits: torch.Tensor, targets: torch.Tensor, valid, temperature: float):
    """logits [B, L, V] or [T, V] (unit stride in V), targets [rows] int64 (rows = B·L or T),
    valid [rows] uint8 or None -> (logp, lse) [rows] in the compute dtype, (nonfinite,
    bad_target) [rows] int32."""
    n_vocab, rows = logits.shape[-1], targets.numel()
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp, lse = (torch.empty(rows, device=logits.device, dtype=acc) for _ in range(2))
    nonfinite, bad_target = (
        torch.empty(rows, device=logits.device, dtype=torch.int32) for _ in range(2)
    )
    if rows > 0:
        _logits_logp_fwd_kernel[launch_grid(rows)](
            logits, targets, valid if valid is not None else targets,  # data
            logp, lse, nonfinite, bad_target,  # outputs
            rows, n_vocab, *row_layout(logits),  # shapes and strides
            float(temperature),  # constants
            HAS_MASK=valid is not None, num_warps=_num_warps(n_vocab),
        )  # fmt: skip
    return logp, lse, nonfinite, bad_target


def grad_logits_triton(logits, targets, valid, lse, coef, temperature: float) -> torch.Tensor:
    """A fresh contiguous buffer like ``logits``, in its dtype: coef * (onehot(target) -
    softmax(logits / T)), zero rows where ``valid`` is 0; ``coef`` [rows] is dL/dlogp / T in the
    compute dtype."""
    n_vocab, rows = logits.shape[-1], targets.numel()
    grad = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
    if rows > 0:
        _logits_logp_bwd_kernel[launch_grid(rows)](
            logits, targets, valid if valid is not None else targets, lse, coef,  # data
            grad,  # output
            rows, n_vocab, *row_layout(logits), n_vocab,  # shapes and strides
            float(temperature),  # constants
            HAS_MASK=valid is not None, num_warps=_num_warps(n_vocab),
        )  # fmt: skip
    return grad


# For benchmarks/compile_check.py (heaviest last): widths at each BLOCK_V step and a real
# vocabulary (Qwen's 152064), every float dtype, padded (mask) and packed (no mask).
_WIDTHS = {_block_v({"n_vocab": v}): v for v in range(4096, 0, -1)}
LAUNCH_SPACE = {
    "dtype": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "vocab": (*sorted(_WIDTHS.values()), 152064),
    "masked": (False, True),
}


def example_launch(dtype, vocab, masked) -> None:
    """Both launches at one point of LAUNCH_SPACE, on CPU tensors (the check records them)."""
    z, t = torch.zeros(2, vocab, dtype=dtype), torch.zeros(2, dtype=torch.long)
    valid = torch.ones(2, dtype=torch.uint8) if masked else None
    logp, lse, _, _ = logprobs_triton(z, t, valid, 1.0)
    grad_logits_triton(z, t, valid, lse, torch.ones_like(lse), 1.0)
