"""PAPO advantages in Triton: the CUDA path of ``papo_advantages`` (kernel + launcher).

One program per group: ``_segment_norm`` finds how to normalize each part over the group's
members (``_member_tile`` loads a tile of them, through PERM when group ids were sorted), then one
pass writes the advantages and a row of statistics per program, in the named slots below (no
atomics: deterministic). The formulas are advantages.py's (its module docstring and
``papo_advantages_ref``); math in float32, sums of advantages in float64.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._backend import Slot, at_offset

# mode -> (outcome reward: None | "outcome" | "product", process members: None | "correct" | "all")
MODES: dict[str, tuple[str | None, str | None]] = {
    "papo": ("outcome", "correct"),
    "orm": ("outcome", None),
    "prm": (None, "all"),
    "mult": ("product", None),
    "fullnorm": ("outcome", "all"),
}

# estimator -> (how a part is normalized within its group, the batch step after it: None |
# "std" | "whiten"); advantages.py's module docstring gives the formulas and the peers they match.
ESTIMATORS: dict[str, tuple[str, str | None]] = {
    "grpo": ("std", None),
    "drgrpo": ("centre", None),
    "rloo": ("loo", None),
    "batch_std": ("centre", "std"),
    "reinforce_pp": ("centre", "whiten"),
    "gdpo": ("std", "whiten"),
}
# the kernel's SCALE switch: what multiplies (x - mean) in a group
SCALES = {"centre": 0, "std": 1, "loo": 2}


class AdvantagesOutput(NamedTuple):
    """Per-response advantages and the group statistics of the same pass.

    ``stats`` holds 0-dim float32 tensors on the input's device (no host sync): ``zero_adv_frac``
    (responses whose advantage is exactly 0), ``proc_active_frac`` (groups whose process part is
    active), ``correct_adv_min``, ``correct_adv_mean``, ``wrong_adv_mean`` (NaN when there is no
    such response) and ``num_groups``.
    """

    advantages: torch.Tensor  # [N] float32, outcome_adv + weight * process_adv
    outcome_adv: torch.Tensor  # [N] float32, 0 in modes without an outcome part
    process_adv: torch.Tensor  # [N] float32, 0 in modes without a process part
    stats: dict[str, torch.Tensor]


def estimator_settings(estimator, scale_by_std, mode, outcome, lengths, reward_weights):
    """(how a part is normalized in its group, the batch step, gdpo's column weights or None)
    of ``estimator`` for ``papo_advantages``' arguments; refuses the combinations that have no
    meaning."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(ESTIMATORS)}, got {estimator!r}")
    if not scale_by_std and estimator != "grpo":
        raise ValueError(f"scale_by_std=False is estimator='drgrpo'; it does not combine with "
                         f"estimator={estimator!r}")  # fmt: skip
    how, step = ESTIMATORS["drgrpo" if not scale_by_std else estimator]
    if lengths is not None and step != "whiten":
        raise ValueError(f"lengths weigh the batch whitening of 'reinforce_pp' and 'gdpo' only, "
                         f"not estimator={estimator!r}")  # fmt: skip
    if estimator != "gdpo":
        if reward_weights is not None:
            raise ValueError("reward_weights weigh the reward columns of estimator='gdpo' only")
        return how, step, None
    if mode != "orm":
        raise ValueError(f"estimator='gdpo' normalizes the columns of outcome [N, K] and needs "
                         f"mode='orm', got mode={mode!r} (PAPO's process part is already a "
                         "reward normalized on its own)")  # fmt: skip
    if not isinstance(outcome, torch.Tensor) or outcome.dim() != 2 or outcome.shape[1] < 1:
        shape = tuple(outcome.shape) if isinstance(outcome, torch.Tensor) else type(outcome)
        raise ValueError(f"estimator='gdpo' needs outcome as [N, K] reward columns, got {shape}")
    k = outcome.shape[1]
    if reward_weights is None:
        return how, step, [1.0] * k
    weights = [float(w) for w in reward_weights]
    if len(weights) != k or not all(abs(w) < float("inf") for w in weights):
        raise ValueError(f"reward_weights must be {k} finite numbers (one per outcome column), "
                         f"got {list(reward_weights)}")  # fmt: skip
    return how, step, weights


# The statistics' sums, float64: the kernel writes one row per program (summed, MIN_CORRECT by
# min), the PyTorch path one vector.
ZERO_ADV = Slot(0)  # responses whose advantage is exactly 0
PROC_ACTIVE = Slot(1)  # groups whose process part is active
N_CORRECT = Slot(2)  # correct responses
SUM_CORRECT = Slot(3)  # sum of their advantages
MIN_CORRECT = Slot(4)  # the smallest of them (+inf when there is none)
N_WRONG = Slot(5)  # wrong responses
SUM_WRONG = Slot(6)  # sum of their advantages
NUM_ADV_STATS = 7


@triton.jit
def _member_tile(
    X, PERM, MEMBER, i, end, BLOCK: tl.constexpr, HAS_PERM: tl.constexpr, ALL_MEMBERS: tl.constexpr
):
    """X (fp32) and the member mask of the BLOCK responses from sorted position i (0 elsewhere)."""
    offs = i + tl.arange(0, BLOCK)
    inb = offs < end
    idx = tl.load(PERM + offs, mask=inb, other=0) if HAS_PERM else offs
    m = inb if ALL_MEMBERS else inb & (tl.load(MEMBER + idx, mask=inb, other=0) != 0)
    return tl.load(X + idx, mask=m, other=0.0).to(tl.float32), m


@triton.jit
def _segment_norm(
    X, PERM, MEMBER, start, end, eps,
    BLOCK: tl.constexpr, HAS_PERM: tl.constexpr, ALL_MEMBERS: tl.constexpr,
    SCALE: tl.constexpr,
):  # fmt: skip
    """How to normalize X over the members of one group, in fp32: (s, mean_y, mul, active), so
    that a member's value is (x / s - mean_y) * mul.

    Group-scaled (three passes over the group, cached): s is the power of two at or below the
    members' largest |x|, so y = x / s is exact and |y| < 2, and neither the sum nor the squares
    of y can overflow; mean and std of x are s times those of y. Squaring raw rewards would
    overflow float32 from |x| ~ 1e19. mul (SCALES): 1 / (std_y + eps / s) ("std"), s
    ("centre") or s * n / (n - 1) ("loo": x minus the mean of the n - 1 others is
    (x - mean) * n / (n - 1)).
    """
    n = 0.0
    max_abs = 0.0
    for i in range(start, end, BLOCK):
        x, m = _member_tile(X, PERM, MEMBER, i, end, BLOCK, HAS_PERM, ALL_MEMBERS)
        n += tl.sum(m.to(tl.float32), axis=0)
        max_abs = tl.maximum(max_abs, tl.max(tl.abs(x), axis=0))
    # the exponent bits of max |x| (2^e <= max |x|), at least the smallest normal 2^-126
    s = (max_abs.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    s = tl.maximum(s, 1.1754943508222875e-38)
    total = 0.0
    for i in range(start, end, BLOCK):
        x, m = _member_tile(X, PERM, MEMBER, i, end, BLOCK, HAS_PERM, ALL_MEMBERS)
        total += tl.sum(x / s, axis=0)
    mean_y = total / tl.maximum(n, 1.0)
    ss = 0.0
    for i in range(start, end, BLOCK):
        x, m = _member_tile(X, PERM, MEMBER, i, end, BLOCK, HAS_PERM, ALL_MEMBERS)
        d = tl.where(m, x / s - mean_y, 0.0)
        ss += tl.sum(d * d, axis=0)
    std_y = tl.sqrt(ss / tl.maximum(n - 1.0, 1.0))
    active = (n >= 2.0) & (std_y * s > eps)  # std > eps; an overflow to inf still compares right
    if SCALE == 1:
        mul = 1.0 / (std_y + eps / s)
    elif SCALE == 2:
        mul = s * (n / tl.maximum(n - 1.0, 1.0))
    else:
        mul = s
    return s, mean_y, mul, active


@triton.heuristics({"HAS_PERM": lambda args: args["PERM"] is not None})
@triton.jit
def _papo_adv_kernel(
    # inputs in the caller's order; PERM (optional) lists them group by group
    OUT_REWARD, PROC_REWARD, CORRECT, PERM, OFFSETS,
    # outputs in the caller's order, and one row of NUM_ADV_STATS partial statistics per program
    ADV, ADV_OUT, ADV_PROC, STATS,
    # constants
    lam, eps,
    BLOCK: tl.constexpr, HAS_PERM: tl.constexpr, OUT_PART: tl.constexpr,
    PROC_PART: tl.constexpr, PROC_ALL: tl.constexpr, SCALE: tl.constexpr,
    NUM_STATS: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(0).to(tl.int64)
    start = tl.load(OFFSETS + g).to(tl.int64)
    end = tl.load(OFFSETS + g + 1).to(tl.int64)
    n_zero = 0.0
    proc_active = 0.0
    n_c = 0.0
    sum_c = tl.full([], 0.0, tl.float64)  # sums of advantages in float64: centred ones (no
    min_c = float("inf")  # division by std) may sum past float32 even when each fits
    n_w = 0.0
    sum_w = tl.full([], 0.0, tl.float64)
    if start < end:  # with group ids the grid is only a bound on the number of groups
        if OUT_PART:
            o_s, o_mean, o_mul, o_act = _segment_norm(
                OUT_REWARD, PERM, CORRECT, start, end, eps, BLOCK, HAS_PERM, True, SCALE
            )
        if PROC_PART:
            p_s, p_mean, p_mul, p_act = _segment_norm(
                PROC_REWARD, PERM, CORRECT, start, end, eps, BLOCK, HAS_PERM, PROC_ALL, SCALE,
            )  # fmt: skip
            proc_active = p_act.to(tl.float32)
        for i in range(start, end, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            inb = offs < end
            idx = tl.load(PERM + offs, mask=inb, other=0) if HAS_PERM else offs
            corr = inb & (tl.load(CORRECT + idx, mask=inb, other=0) != 0)
            a_out = tl.zeros([BLOCK], dtype=tl.float32)
            a_proc = tl.zeros([BLOCK], dtype=tl.float32)
            if OUT_PART:
                a_out = tl.load(OUT_REWARD + idx, mask=inb, other=0.0).to(tl.float32)
                a_out = tl.where(o_act, (a_out / o_s - o_mean) * o_mul, 0.0)
            if PROC_PART:
                a_proc = tl.load(PROC_REWARD + idx, mask=inb, other=0.0).to(tl.float32)
                a_proc = tl.where(p_act, (a_proc / p_s - p_mean) * p_mul, 0.0)
                a_proc = tl.where(inb if PROC_ALL else corr, a_proc, 0.0)
            adv = a_out + lam * a_proc
            tl.store(ADV + idx, adv, mask=inb)
            tl.store(ADV_OUT + idx, a_out, mask=inb)
            tl.store(ADV_PROC + idx, a_proc, mask=inb)
            wrong = inb & ~corr
            n_zero += tl.sum((inb & (adv == 0.0)).to(tl.float32), axis=0)
            n_c += tl.sum(corr.to(tl.float32), axis=0)
            sum_c += tl.sum(tl.where(corr, adv, 0.0).to(tl.float64), axis=0)
            min_c = tl.minimum(min_c, tl.min(tl.where(corr, adv, float("inf")), axis=0))
            n_w += tl.sum(wrong.to(tl.float32), axis=0)
            sum_w += tl.sum(tl.where(wrong, adv, 0.0).to(tl.float64), axis=0)
    # statistics of the same pass, one row per program (no atomics: deterministic, no contention)
    row = STATS + g * NUM_STATS
    tl.store(row + ZERO_ADV, n_zero)
    tl.store(row + PROC_ACTIVE, proc_active)
    tl.store(row + N_CORRECT, n_c)
    tl.store(row + SUM_CORRECT, sum_c)
    tl.store(row + MIN_CORRECT, min_c)
    tl.store(row + N_WRONG, n_w)
    tl.store(row + SUM_WRONG, sum_w)


def kernel_rewards(
    mode: str, outcome: torch.Tensor, process: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
    """What ``mode`` normalizes (MODES): (outcome part | None, process part | None, whether the
    process part is normalized over all members). Floats stay in their dtype, integers become
    float32; the "mult" product is formed in float64 (in float32 or float16 it may overflow, in an
    integer dtype wrap)."""
    out_kind, proc_kind = MODES[mode]
    out_r = None
    if out_kind == "product":
        out_r = outcome.double() * process.double()
    elif out_kind is not None:
        out_r = outcome if outcome.is_floating_point() else outcome.float()
    proc_r = None
    if proc_kind is not None:
        proc_r = process if process.is_floating_point() else process.float()
    return out_r, proc_r, proc_kind == "all"


def adv_launch_config(n: int, num_programs: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for n responses over num_programs group slots: BLOCK covers the mean
    group in one tile (groups of ~8 are the norm; larger ones loop over BLOCK-wide tiles), from
    16 to 1024, with 1 warp up to 128 and 4 above."""
    block = min(max(triton.next_power_of_2(triton.cdiv(n, max(num_programs, 1))), 16), 1024)
    return block, 1 if block <= 128 else 4


def papo_advantages_triton(
    out_r, proc_r, correct, perm, offsets, lam, eps, proc_all, scale
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One program per group slot, ``scale`` a key of SCALES; returns the three [N] float32
    outputs and the [NUM_ADV_STATS] float64 sums, on the inputs' device.

    Bytes: reads rewards, flags and perm (~3 passes over each group, cached), writes 3 x 4 x N.
    """
    n = correct.numel()
    num_programs = offsets.numel() - 1
    adv, adv_out, adv_proc = (
        torch.empty(n, dtype=torch.float32, device=correct.device) for _ in range(3)
    )
    partials = torch.empty(num_programs, NUM_ADV_STATS, dtype=torch.float64, device=correct.device)
    block, num_warps = adv_launch_config(n, num_programs)
    _papo_adv_kernel[(num_programs,)](
        out_r, proc_r, correct, perm, offsets,
        adv, adv_out, adv_proc, partials,
        lam, eps,
        BLOCK=block, OUT_PART=out_r is not None, PROC_PART=proc_r is not None,
        PROC_ALL=proc_all, SCALE=SCALES[scale], NUM_STATS=NUM_ADV_STATS,
        num_warps=num_warps,
    )  # fmt: skip
    stats = partials.sum(0)
    stats[MIN_CORRECT] = partials[:, MIN_CORRECT].amin()
    return adv, adv_out, adv_proc, stats


# ----------------------------------------------------------------------------- launch space
# Every input papo_advantages can hand the launcher, for the ahead-of-time compile check
# (benchmarks/compile_check.py): each dimension's values, the heaviest (most registers) last.
# Group sizes are the first size of each (BLOCK, num_warps) that adv_launch_config picks; with
# group ids there is one program slot per response, so those launches always get its smallest.
LAUNCH_SPACE = {
    "mode": tuple(MODES),
    "dtype": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "group_ids": (True, False),
    "group_size": tuple({adv_launch_config(g, 1): g for g in range(4096, 0, -1)}.values())[::-1],
    "num_groups": (1, 3),
    "scale": tuple(SCALES),
    "aligned": (False, True),
}
HEAVY_DIMS = ("mode", "dtype")  # compiled in every combination, the other dimensions heaviest


def example_launch(mode, dtype, group_ids, group_size, num_groups, scale, aligned) -> None:
    """The launch papo_advantages makes at one point of LAUNCH_SPACE, on CPU tensors (the compile
    check records it instead of running it); not aligned: the caller's tensors are slices."""
    n = group_size * num_groups
    outcome, process = (at_offset(torch.ones(n, dtype=dtype), aligned) for _ in range(2))
    correct = at_offset(torch.ones(n, dtype=torch.bool), aligned)
    if group_ids:  # papo_advantages sorts the ids: a perm, and one offsets slot per response
        perm, offsets = torch.arange(n), torch.full((n + 1,), n)
    else:
        perm, offsets = None, at_offset(torch.arange(0, n + 1, group_size), aligned)
    out_r, proc_r, proc_all = kernel_rewards(mode, outcome, process)
    papo_advantages_triton(out_r, proc_r, correct, perm, offsets, 1.0, 1e-6, proc_all, scale)
