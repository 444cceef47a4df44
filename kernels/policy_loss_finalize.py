"""The policy loss's finalization: from the token pass's sums to the loss, 1 / D and the metrics.

Both backends' token passes end in sums (policy_loss_torch.py's stats vector, or one row of it per
Triton program); this turns them into the loss, the metrics, and 1 / D, the global denominator of
the aggregation (policy_loss.py's docstring):

- ``finalize_triton``: ``_policy_loss_finalize_kernel``, one program, when the caller's counts
  are numbers or absent;
- ``finalize_torch``: torch ops on O(1) data, when some count is a tensor (its value stays on the
  device: no host sync), and the PyTorch path's;
- ``folded_inv_denom``: 1 / D as a Python number when the counts that make D are numbers, so that
  the token pass can store the gradient already divided by D.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .loss_config import AGGS, PolicyLossConfig
from .policy_loss_torch import (
    CLIP_LOW,
    COUNT,
    LOSS,
    NONFINITE_LOGP,
    NONFINITE_ROLLOUT,
    NUM_METRICS,
    NUM_STATS,
    RATIO,
    RATIO_MAX,
    RATIO_MIN,
)

Count = int | float | torch.Tensor


@triton.jit
def _slot(v, cols, k: tl.constexpr):
    """v[k] of a small register vector, as a scalar."""
    return tl.sum(tl.where(cols == k, v, 0.0), axis=0)


@triton.jit
def _policy_loss_finalize_kernel(
    # inputs: per-program stat rows [P, NUM_STATS], valid tokens per sequence [B]
    partials_ptr, counts_ptr,
    # outputs: loss [], 1 / D [], metrics [NUM_METRICS] in the stats' named slots
    loss_ptr, inv_denom_ptr, metrics_ptr,
    # shapes
    P, B,
    # the caller's global counts, 0 when not given (runtime floats)
    num_tokens, num_seqs, max_len,
    # switches
    PER_SEQ: tl.constexpr, NORM: tl.constexpr, SUM: tl.constexpr, HAS_COUNTS: tl.constexpr,
    NUM_STATS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program: sum the rows in float64, divide by D, write loss, 1 / D and the metrics (each
    in the slot of the sum it is made from).

    It replaces a dozen tiny torch ops (and their launches) after the token pass.
    """
    cols = tl.arange(0, NUM_STATS)
    sums = tl.zeros([NUM_STATS], tl.float64)
    lo = tl.full([BLOCK], float("inf"), tl.float32)
    hi = tl.full([BLOCK], -float("inf"), tl.float32)
    for start in range(0, P, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        ok = rows < P
        tile = tl.load(
            partials_ptr + rows[:, None] * NUM_STATS + cols[None, :], mask=ok[:, None], other=0.0
        )
        sums += tl.sum(tile.to(tl.float64), axis=0)
        row_min = tl.load(partials_ptr + rows * NUM_STATS + RATIO_MIN, mask=ok, other=float("inf"))
        lo = tl.minimum(lo, row_min)
        row_max = tl.load(partials_ptr + rows * NUM_STATS + RATIO_MAX, mask=ok, other=-float("inf"))
        hi = tl.maximum(hi, row_max)
    count = _slot(sums, cols, COUNT)
    zero = count * 0.0  # a float64 scalar tensor: the runtime floats below become float64 too

    if SUM:  # token-sum: D = 1
        denom = zero + 1.0
    elif PER_SEQ:  # N_seqs, times L_max for the Dr. GRPO norm
        n_seqs = zero + num_seqs
        l_max = zero + max_len
        if HAS_COUNTS:  # this call's own, where the caller gave none
            nonempty = tl.zeros([BLOCK], tl.float64)
            longest = tl.zeros([BLOCK], tl.float32)
            for start in range(0, B, BLOCK):
                idx = start + tl.arange(0, BLOCK)
                c = tl.load(counts_ptr + idx, mask=idx < B, other=0.0)
                nonempty += (c > 0).to(tl.float64)
                longest = tl.maximum(longest, c)
            n_seqs = tl.where(num_seqs > 0, n_seqs, tl.sum(nonempty, axis=0))
            l_max = tl.where(max_len > 0, l_max, tl.max(longest, axis=0).to(tl.float64))
        denom = n_seqs * l_max if NORM else n_seqs
    else:
        denom = tl.where(num_tokens > 0, zero + num_tokens, count)
    inv = tl.where(denom > 0, 1.0 / tl.where(denom > 0, denom, 1.0), 0.0)  # none valid: 0, not NaN
    out = loss_ptr.dtype.element_ty
    loss = (_slot(sums, cols, LOSS) * inv).to(out)
    tl.store(loss_ptr, loss)
    tl.store(inv_denom_ptr, inv.to(out))

    tl.store(metrics_ptr + LOSS, loss)
    n = tl.maximum(count, 1.0)
    for k in tl.static_range(CLIP_LOW, RATIO + 1):  # sums -> means over the valid tokens
        tl.store(metrics_ptr + k, (_slot(sums, cols, k) / n).to(out))
    tl.store(metrics_ptr + RATIO_MIN, tl.where(count > 0, tl.min(lo, axis=0), 0.0).to(out))
    tl.store(metrics_ptr + RATIO_MAX, tl.where(count > 0, tl.max(hi, axis=0), 0.0).to(out))
    tl.store(metrics_ptr + COUNT, count.to(out))
    for k in tl.static_range(NONFINITE_LOGP, NONFINITE_ROLLOUT + 1):  # counts, as they are
        tl.store(metrics_ptr + k, _slot(sums, cols, k).to(out))


def reduce_partials(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The stats vector of policy_loss_torch from the kernel's rows (for the torch finalization):
    sums of the slots in use, min / max of the ratio's."""
    stats = partials[:, :NUM_METRICS].sum(0, dtype=torch.float64)
    stats[RATIO_MIN] = partials[:, RATIO_MIN].min()
    stats[RATIO_MAX] = partials[:, RATIO_MAX].max()
    return stats.to(dtype)


def finalize_triton(
    partials, counts, cfg, num_tokens, num_seqs, max_len, dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss [], 1 / D [], metrics [NUM_METRICS]) in one launch; the counts are numbers or None."""
    dev = partials.device
    loss = torch.empty((), dtype=dtype, device=dev)
    inv_denom = torch.empty((), dtype=dtype, device=dev)
    metrics = torch.empty(NUM_METRICS, dtype=dtype, device=dev)
    _policy_loss_finalize_kernel[(1,)](
        partials, partials if counts is None else counts,
        loss, inv_denom, metrics,
        partials.shape[0], 0 if counts is None else counts.numel(),
        float(num_tokens or 0), float(num_seqs or 0), float(max_len or 0),
        PER_SEQ=cfg.agg.startswith("seq-mean"), NORM=cfg.agg == "seq-mean-token-sum-norm",
        SUM=cfg.agg == "token-sum",
        HAS_COUNTS=counts is not None, NUM_STATS=NUM_STATS, BLOCK=256,
    )  # fmt: skip
    return loss, inv_denom, metrics


def valid_count(value: torch.Tensor) -> torch.Tensor:
    """[] bool on the count's device: > 0 and finite (a caller's count of tokens, sequences or
    positions; 0 would make the loss and its gradient 0 in silence). No host sync."""
    return ((value > 0) & torch.isfinite(value)).reshape(())


def finalize_torch(cfg, stats, seq_counts, num_tokens, num_seqs, max_len):
    """(loss, 1 / D, metrics [NUM_METRICS]) from a stats vector, in torch ops; no host sync.

    Each metric goes in the slot of the sum it is made from (policy_loss_torch.py)."""
    denom = denominator(cfg, stats, seq_counts, num_tokens, num_seqs, max_len)
    # nothing valid (local counts 0): loss 0, not NaN; a bad count of the caller's is NaN here
    inv_denom = torch.where(denom != 0, 1.0 / denom, 0.0)
    loss = stats[LOSS] * inv_denom
    count = stats[COUNT]
    metrics = stats[:NUM_METRICS].clone()
    metrics[LOSS] = loss
    metrics[CLIP_LOW : RATIO + 1] /= count.clamp(min=1)  # sums -> means over the valid tokens
    ratio_range = metrics[RATIO_MIN : RATIO_MAX + 1]
    metrics[RATIO_MIN : RATIO_MAX + 1] = torch.where(count > 0, ratio_range, 0.0)  # none: 0
    return loss, inv_denom, metrics


def denominator(cfg, stats, seq_counts, num_tokens, num_seqs, max_len) -> torch.Tensor:
    """D of the aggregation (module docstring): a 0-dim tensor, no host sync."""

    def value(given: Count | None, local) -> torch.Tensor:  # local: computed only when needed
        if given is None:
            return local()
        if not isinstance(given, torch.Tensor):  # checked by check_inputs
            return torch.as_tensor(given).to(stats).reshape(())
        # Unchecked (check_finite=False, no sync): a bad count makes the loss NaN, never 0.
        given = given.reshape(()).to(stats)
        return torch.where(valid_count(given), given, math.nan)

    if cfg.agg == "token-mean":
        return value(num_tokens, lambda: stats[COUNT])
    if cfg.agg == "token-sum":
        return torch.ones_like(stats[COUNT])
    denom = value(num_seqs, lambda: (seq_counts > 0).sum().to(stats))
    if cfg.agg == "seq-mean-token-sum-norm":
        denom = denom * value(max_len, lambda: seq_counts.max().to(stats))
    return denom


def folded_inv_denom(cfg: PolicyLossConfig, num_tokens, num_seqs, max_len) -> float | None:
    """1 / D when the counts that make D under ``cfg.agg`` are numbers (checked > 0 and finite),
    else None: D is then known only after the token pass (local counts) or on the device (tensor
    counts)."""
    if cfg.agg == "token-sum":
        needed = ()
    elif cfg.agg == "token-mean":
        needed = (num_tokens,)
    elif cfg.agg == "seq-mean-token-sum-norm":
        needed = (num_seqs, max_len)
    else:
        needed = (num_seqs,)
    if any(c is None or isinstance(c, torch.Tensor) for c in needed):
        return None
    return 1.0 / math.prod(float(c) for c in needed)


# ------------------------------------------------------------------------------------------------
# Every input policy_loss can hand finalize_triton, for the ahead-of-time compile check
# (benchmarks/compile_check.py): the rows of 1, 5 and 16 token-pass programs (Triton specializes on
# 1 and on multiples of 16), the sequences likewise, the heaviest values last.
LAUNCH_SPACE = {
    "dtype": (torch.float32, torch.float64),
    "agg": tuple(sorted(AGGS)),
    "programs": (1, 5, 16),
    "seqs": (1, 5, 16),
    "counts": ("given", "local"),
}
HEAVY_DIMS = ("dtype", "agg", "counts")


def example_launch(dtype, agg, programs, seqs, counts) -> None:
    """The launch policy_loss makes at one point of LAUNCH_SPACE, on CPU tensors (the compile
    check records it instead of running it); local per-sequence counts only where D needs them."""
    cfg = PolicyLossConfig(agg=agg)
    partials = torch.zeros((programs, NUM_STATS), dtype=torch.float32)
    num = (None,) * 3 if counts == "local" else (programs * 1024, seqs, 1024)
    seq_counts = torch.ones(seqs) if counts == "local" and agg != "token-mean" else None
    finalize_triton(partials, seq_counts, cfg, *num, dtype)
