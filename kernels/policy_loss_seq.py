"""The per-sequence pass of ``policy_loss``'s Triton path (policy_loss_triton.py launches it).

``_policy_loss_seq_stats_kernel``, one program per sequence looping over it: |y_i| and, at
sequence level, the mean log-ratio; with rollout correction, the sequence's rollout log-weight
and whether rejection keeps it. Launched only when something per-sequence is needed; at token
level without rollout correction it reads only the mask.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._backend import at_offset
from .loss_config import RATIO_LEVELS, ROLLOUT_RS, PolicyLossConfig


@triton.jit
def _policy_loss_seq_stats_kernel(
    # inputs
    logp_ptr, old_ptr, mask_ptr, cu_ptr, rollout_ptr,
    # outputs, [B] float32; seq_w [2, B]: the sequence's log rollout weight, and 1 / 0 kept
    count_ptr, lr_mean_ptr, seq_w_ptr,
    # shapes
    L, B,
    # the rejection band's logs (runtime floats)
    log_lo, log_hi,
    # switches
    PACKED: tl.constexpr, HAS_OLD: tl.constexpr, SEQ_LEVEL: tl.constexpr,
    IS_SEQ: tl.constexpr, RS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program per sequence: valid tokens |y_i| and, at sequence level, the mean log-ratio.
    With rollout rejection (RS: 0 off, 1 token, 2 sequence, 3 geometric) |y_i| and the mean count
    the kept tokens only; IS_SEQ: the sequence's rollout log-weight, clamped to +-20."""
    seq = tl.program_id(0).to(tl.int64)
    if PACKED:
        start = tl.load(cu_ptr + seq).to(tl.int64)
        end = tl.load(cu_ptr + seq + 1).to(tl.int64)
    else:
        start = seq * L
        end = start + L
    count = tl.zeros([BLOCK], tl.float32)
    count_in = tl.zeros([BLOCK], tl.float32)
    lr_sum = tl.zeros([BLOCK], tl.float32)
    lw_sum = tl.zeros([BLOCK], tl.float32)  # of old - rollout; lwc_sum: each clamped to +-20
    lwc_sum = tl.zeros([BLOCK], tl.float32)
    for block_start in range(start, end, BLOCK):  # a loop, not a grid dim: any length works
        offs = block_start + tl.arange(0, BLOCK)
        valid = offs < end
        if not PACKED:
            valid &= tl.load(mask_ptr + offs, mask=valid, other=0) != 0
        if IS_SEQ or RS != 0:
            lw = tl.load(logp_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            if HAS_OLD:
                lw = tl.load(old_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            lw -= tl.load(rollout_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            lwc = tl.minimum(tl.maximum(lw, -20.0), 20.0)
            lw_sum += tl.where(valid, lw, 0.0)
            lwc_sum += tl.where(valid, lwc, 0.0)
            count_in += valid.to(tl.float32)
            if RS == 1:  # rejected tokens leave the mask
                valid &= (lwc >= log_lo) & (lwc <= log_hi)
        count += valid.to(tl.float32)
        if SEQ_LEVEL and HAS_OLD:
            lp = tl.load(logp_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            old = tl.load(old_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            lr_sum += lp - old
    n = tl.sum(count, axis=0)
    if RS >= 2:  # the sequence's product of token ratios, or their geometric mean
        stat = tl.sum(lwc_sum, axis=0)
        if RS == 3:
            stat = stat / tl.maximum(tl.sum(count_in, axis=0), 1.0)
        kept = (stat >= log_lo) & (stat <= log_hi)
        n = tl.where(kept, n, 0.0)
        tl.store(seq_w_ptr + B + seq, kept.to(tl.float32))
    if IS_SEQ:
        tl.store(seq_w_ptr + seq, tl.minimum(tl.maximum(tl.sum(lw_sum, axis=0), -20.0), 20.0))
    tl.store(count_ptr + seq, n)
    if SEQ_LEVEL:
        tl.store(lr_mean_ptr + seq, tl.sum(lr_sum, axis=0) / tl.maximum(n, 1.0))


def _block(n: int) -> int:
    """Tokens per program: 1024 (4 warps, 8 a thread), or the next power of two for tiny inputs."""
    return min(1024, triton.next_power_of_2(max(n, 16)))


def seq_stats_triton(
    logp, old_logp, mask, cu_seqlens, rollout_logp, cfg: PolicyLossConfig, needed: bool
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(counts [B] or None when not ``needed``, lr_mean [B] at sequence level, seq_w [2, B] with
    a sequence weight or sequence rejection) of contiguous, checked inputs; mask as uint8."""
    packed = cu_seqlens is not None
    n = logp.numel()
    b = cu_seqlens.numel() - 1 if packed else logp.shape[0]
    dev = logp.device
    seq_level = cfg.ratio_level == "sequence"
    is_seq = rollout_logp is not None and cfg.is_level == "sequence"
    rs = ROLLOUT_RS.index(cfg.rollout_rs)
    lr_mean = torch.empty(b if seq_level else 1, dtype=torch.float32, device=dev)
    seq_w = torch.empty(2 * b if is_seq or rs >= 2 else 1, dtype=torch.float32, device=dev)
    if not needed:
        return None, lr_mean, seq_w
    counts = torch.empty(b, dtype=torch.float32, device=dev)
    ptr = lambda t: logp if t is None else t  # noqa: E731  absent: a valid, never-read pointer
    _policy_loss_seq_stats_kernel[(b,)](
        logp, ptr(old_logp), ptr(mask), ptr(cu_seqlens), ptr(rollout_logp),
        counts, lr_mean, seq_w,
        0 if packed else logp.shape[1], b,
        math.log(cfg.rs_low), math.log(cfg.rs_high),
        PACKED=packed, HAS_OLD=old_logp is not None, SEQ_LEVEL=seq_level,
        IS_SEQ=is_seq, RS=rs, BLOCK=_block(n // b),
    )  # fmt: skip
    return counts, lr_mean, seq_w


# ------------------------------------------------------------------------------------------------
# Every input seq_stats_triton can get, for the ahead-of-time compile check
# (benchmarks/compile_check.py); the heaviest value of each dimension last.
LAUNCH_SPACE = {
    "dtype": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "packed": (False, True),
    "tokens": (*tuple({_block(t): t for t in range(4096, 0, -1)}.values())[::-1], 4096),
    "seqs": (1, 5, 16),
    "old": (False, True),
    "ratio_level": RATIO_LEVELS,
    # rollout correction: none, a sequence weight, rejection by token / sequence / geometric mean
    "rollout": ("off", "sequence", "rs-token", "rs-sequence", "rs-geometric"),
    "mask": (torch.float32, torch.int64, torch.bool),
    "cu_seqlens": (torch.int64, torch.int32),
    "aligned": (False, True),
}


def example_launch(
    dtype, packed, tokens, seqs, old, ratio_level, rollout, mask, cu_seqlens, aligned
) -> None:  # fmt: skip
    """The launch seq_stats_triton makes at one point of LAUNCH_SPACE, on CPU tensors (the
    compile check records it instead of running it)."""
    cfg = PolicyLossConfig(
        ratio_level=ratio_level, rollout_rs=rollout[3:] if rollout[:3] == "rs-" else None,
        is_level="sequence" if rollout == "sequence" else "token",
    )  # fmt: skip
    length = -(-tokens // seqs)
    shape = (tokens,) if packed else (seqs, length)
    given = lambda on, s=shape, d=dtype: at_offset(torch.zeros(s, dtype=d), aligned) if on else None
    cu = torch.linspace(0, tokens, seqs + 1).to(cu_seqlens)
    m, cu = (None, given(True, cu.shape, cu_seqlens)) if packed else (given(True, d=mask), None)
    m = m.view(torch.uint8) if m is not None and m.dtype == torch.bool else m
    seq_stats_triton(given(True), given(old), m, cu, given(rollout != "off"), cfg, True)
