"""The clipped GRPO token loss in Triton: the CUDA path of ``policy_loss`` (kernels + launchers).

Over flat token arrays of either layout (padded [B, L] + mask, packed [T] + cu_seqlens), never with
a sequence length on a grid dimension:

- ``_policy_loss_seq_stats_kernel`` (policy_loss_seq.py), one program per sequence looping over
  it: |y_i|, at sequence level the mean log-ratio, the rollout correction's sequence values.
  Launched only when something per-sequence is needed.
- ``_policy_loss_fwd_kernel``, BLOCK tokens per program: the per-token loss and its gradient
  (written once) and one row of stat sums per program (loss, counts, clip/dual-clip/KL/ratio sums,
  ratio min/max, non-finite counts). A packed token finds its sequence by binary search over
  cu_seqlens (log2 B cached loads): no per-token index is read.
  With the counts given as numbers, the gradient is stored already divided by D (``grad_scale``).
- the backward, ``scale_grad_`` (policy_loss_scale.py): the stored gradient times a 0-dim
  device scalar, in place; each program returns when the scalar is exactly 1 (no host sync).

The rows become the loss, 1 / D and the metrics in policy_loss_finalize.py. So a forward is 2 or 3
launches, a backward one that moves no token bytes when grad_output is 1 and D was folded in. The
formulas follow policy_loss_torch.py line by line; fp32 math whatever the input dtype.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._backend import at_offset, compute_dtype
from .loss_config import (
    AGGS,
    COV_TYPES,
    KLS,
    LOSS_TYPES,
    RATIO_LEVELS,
    ROLLOUT_RS,
    PolicyLossConfig,
)
from .policy_loss_finalize import folded_inv_denom
from .policy_loss_scale import scale_grad_  # noqa: F401  (the backward's launcher, re-exported)
from .policy_loss_seq import _block, seq_stats_triton
from .policy_loss_torch import (
    CLIP_HIGH,
    CLIP_LOW,
    COUNT,
    DUAL_CLIP,
    FLAG_CLIP_HIGH,
    FLAG_CLIP_LOW,
    FLAG_DUAL,
    KL,
    LOSS,
    NONFINITE_ADV,
    NONFINITE_LOGP,
    NONFINITE_OLD,
    NONFINITE_REF,
    NONFINITE_ROLLOUT,
    NUM_STATS,
    RATIO,
    RATIO_MAX,
    RATIO_MIN,
)


@triton.heuristics({"BLOCK": lambda args: _block(args["N"])})
@triton.jit
def _policy_loss_fwd_kernel(
    # inputs
    logp_ptr, old_ptr, adv_ptr, mask_ptr, cu_ptr, ref_ptr, rollout_ptr,
    # per-sequence stats from _policy_loss_seq_stats_kernel; the caller's rollout weights
    count_ptr, lr_mean_ptr, seq_w_ptr, is_w_ptr,
    # clip_cov / kl_cov's selected tokens, like logp (uint8), read by those types only
    select_ptr,
    # outputs: grad like logp, partials [programs, NUM_STATS] float32
    grad_ptr, partials_ptr,
    # per-token outputs (PER_TOKEN only), like logp: loss, KL (compute dtype), flags (uint8)
    tok_loss_ptr, tok_kl_ptr, tok_flags_ptr,
    # shapes
    N, L, B, search_steps,
    # hyper-parameters: runtime floats, a new value does not recompile
    eps_low, eps_high, dual_clip, beta, is_cap, tau_pos, tau_neg, kl_cov_coef, log_lo, log_hi,
    # the stored gradient's factor: 1 / D when the counts are numbers, else 1 (a runtime float)
    grad_scale,
    # switches
    PACKED: tl.constexpr, HAS_OLD: tl.constexpr, ADV_PER_TOKEN: tl.constexpr,
    SEQ_LEVEL: tl.constexpr, PER_SEQ_MEAN: tl.constexpr, HAS_DUAL: tl.constexpr,
    HAS_ROLLOUT: tl.constexpr, IS_SEQ: tl.constexpr, RS: tl.constexpr, IS_W: tl.constexpr,
    LOSS_TYPE: tl.constexpr,
    KL_TYPE: tl.constexpr, KL_RATIO: tl.constexpr, PER_TOKEN: tl.constexpr,
    NUM_STATS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """BLOCK flat tokens per program: per-token loss and gradient, and one row of stat sums.

    LOSS_TYPE: the index of loss_type in LOSS_TYPES (ppo, cispo, sapo, gpg, clip_cov, kl_cov).
    PER_TOKEN: store each token's loss, KL and flags too (0 where masked). KL_TYPE: 0 = no KL
    term (ref_logp not read), else 1 + the index of kl in KLS (k1, k2, k3, abs, k3+). KL_RATIO:
    the KL term times the token ratio. Rollout correction: IS_SEQ, the weight per sequence; RS,
    rejection (0 off, 1 token, else per sequence: seq_w's kept flags); IS_W, the caller's weights
    (0 none, 1 per sequence, 2 per token). policy_loss_torch.py holds the formulas this kernel
    follows line by line.
    """
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < N
    if PACKED:  # seq = the last i with cu[i] <= t (empty sequences are skipped over)
        lo = tl.zeros([BLOCK], tl.int64)
        hi = lo + (B - 1)
        for _ in range(search_steps):
            mid = (lo + hi + 1) // 2
            right = tl.load(cu_ptr + mid, mask=in_range, other=0).to(tl.int64) <= offs
            lo = tl.where(right, mid, lo)
            hi = tl.where(right, hi, mid - 1)
        seq = lo
        valid = in_range
    else:
        seq = offs // L
        valid = in_range & (tl.load(mask_ptr + offs, mask=in_range, other=0) != 0)

    lp = tl.load(logp_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    old = lp
    if HAS_OLD:
        old = tl.load(old_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if ADV_PER_TOKEN:
        adv = tl.load(adv_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    else:
        adv = tl.load(adv_ptr + seq, mask=valid, other=0.0).to(tl.float32)
    if HAS_ROLLOUT:
        rollout = tl.load(rollout_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    valid_in = valid  # the caller's mask: non-finite inputs are counted over it
    if RS == 1:
        lwc = tl.minimum(tl.maximum(old - rollout, -20.0), 20.0)
        valid &= (lwc >= log_lo) & (lwc <= log_hi)  # NaN: rejected
    elif RS != 0:
        valid &= tl.load(seq_w_ptr + B + seq, mask=valid, other=0.0) != 0.0
    if SEQ_LEVEL:
        ratio = tl.exp(tl.load(lr_mean_ptr + seq, mask=valid, other=0.0))
    else:
        ratio = tl.exp(lp - old)

    ratio_clipped = tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
    clip_high = tl.zeros([BLOCK], tl.int1)
    clip_low = tl.zeros([BLOCK], tl.int1)
    dual = tl.zeros([BLOCK], tl.int1)
    if LOSS_TYPE == 0 or LOSS_TYPE == 4:  # ppo, clip_cov
        clip_high = (ratio > 1.0 + eps_high) & (adv > 0)
        clip_low = (ratio < 1.0 - eps_low) & (adv < 0)
        clipped = clip_high | clip_low
        pg = -adv * tl.where(clipped, ratio_clipped, ratio)
        dpg = tl.where(clipped, 0.0, -adv)  # d pg / d ratio
        if HAS_DUAL:
            bound = -dual_clip * adv
            dual = (adv < 0) & (pg > bound)
            pg = tl.where(dual, bound, pg)
            dpg = tl.where(dual, 0.0, dpg)
        dloss = dpg * ratio
        if LOSS_TYPE == 4:  # clip_cov: the selected tokens' loss and gradient are 0
            chosen = tl.load(select_ptr + offs, mask=valid, other=0) != 0
            pg = tl.where(chosen, 0.0, pg)
            dloss = tl.where(chosen, 0.0, dloss)
    elif LOSS_TYPE == 1:  # cispo: -sg(clip(ratio)) * A * logp, clipped for any A
        clip_high = ratio > 1.0 + eps_high
        clip_low = ratio < 1.0 - eps_low
        dloss = -adv * ratio_clipped
        pg = dloss * lp
    elif LOSS_TYPE == 2:  # sapo: -A * sigmoid(tau (ratio - 1)) * 4 / tau
        tau = tl.where(adv > 0, tau_pos, tau_neg)
        gate = tl.sigmoid(tau * (ratio - 1.0))
        pg = -adv * gate * (4.0 / tau)
        dloss = -adv * 4.0 * gate * (1.0 - gate) * ratio
    elif LOSS_TYPE == 5:  # kl_cov: -A * ratio, unclipped, + coef * |logp - old| where selected
        chosen = (tl.load(select_ptr + offs, mask=valid, other=0) != 0).to(tl.float32)
        lr = lp - old
        sign = tl.where(lr > 0, 1.0, tl.where(lr < 0, -1.0, 0.0))
        pg = -adv * ratio + kl_cov_coef * chosen * tl.abs(lr)
        dloss = -adv * ratio + kl_cov_coef * chosen * sign
    else:  # gpg: -A * logp
        pg = -adv * lp
        dloss = -adv
    if HAS_ROLLOUT:
        log_w = old - rollout
        if IS_SEQ:
            log_w = tl.load(seq_w_ptr + seq, mask=valid, other=0.0)
        # is_cap = inf when off; a NaN weight stays NaN, as torch.clamp leaves it
        w = tl.minimum(tl.exp(log_w), is_cap, propagate_nan=tl.PropagateNan.ALL)
        pg *= w
        dloss *= w
    elif IS_W != 0:  # the caller's, as given
        w_offs = seq if IS_W == 1 else offs
        w = tl.load(is_w_ptr + w_offs, mask=valid_in, other=0.0).to(tl.float32)
        pg *= w
        dloss *= w
    loss = pg
    kl = tl.zeros([BLOCK], tl.float32)
    nonfinite_ref = tl.zeros([BLOCK], tl.int1)
    if KL_TYPE != 0:
        ref = tl.load(ref_ptr + offs, mask=valid_in, other=0.0).to(tl.float32)
        nonfinite_ref = ~(tl.abs(ref) < float("inf"))
        delta = lp - ref
        if KL_TYPE == 1:
            kl = delta
            dkl = tl.full([BLOCK], 1.0, tl.float32)
        elif KL_TYPE == 2:
            kl = 0.5 * delta * delta
            dkl = delta
        elif KL_TYPE == 4:  # abs, with sign(delta) as its gradient (0 at 0)
            kl = tl.abs(delta)
            dkl = tl.where(delta > 0, 1.0, tl.where(delta < 0, -1.0, 0.0))
        else:  # k3, and k3+ with k2's gradient
            e = tl.exp(-delta)
            kl = e + delta - 1.0
            dkl = 1.0 - e if KL_TYPE == 3 else delta
        if KL_RATIO:  # d (ratio * KL) / d logp = ratio * (KL + d KL)
            dkl = ratio * (kl + dkl)
            kl = kl * ratio
        loss += beta * kl
        dloss += beta * dkl

    coef = valid.to(tl.float32)
    if PER_SEQ_MEAN:
        coef = coef / tl.maximum(tl.load(count_ptr + seq, mask=valid, other=1.0), 1.0)
    grad = tl.where(valid, coef * dloss * grad_scale, 0.0)
    tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=in_range)
    if PER_TOKEN:  # the flags' bits: policy_loss_torch.py's FLAG_*
        tl.store(tok_loss_ptr + offs, tl.where(valid, loss, 0.0), mask=in_range)
        tl.store(tok_kl_ptr + offs, tl.where(valid, kl, 0.0), mask=in_range)
        flags = (clip_low.to(tl.uint8) * FLAG_CLIP_LOW) | (clip_high.to(tl.uint8) * FLAG_CLIP_HIGH)
        flags = tl.where(valid, flags | (dual.to(tl.uint8) * FLAG_DUAL), 0)
        tl.store(tok_flags_ptr + offs, flags.to(tl.uint8), mask=in_range)

    # One row of sums, in the named slots of policy_loss_torch.py; finite means |x| < inf (NaN
    # fails it too).
    row = partials_ptr + pid.to(tl.int64) * NUM_STATS
    tl.store(row + LOSS, tl.sum(tl.where(valid, coef * loss, 0.0), axis=0))
    tl.store(row + CLIP_LOW, tl.sum((valid & clip_low).to(tl.float32), axis=0))
    tl.store(row + CLIP_HIGH, tl.sum((valid & clip_high).to(tl.float32), axis=0))
    tl.store(row + DUAL_CLIP, tl.sum((valid & dual).to(tl.float32), axis=0))
    tl.store(row + KL, tl.sum(tl.where(valid, kl, 0.0), axis=0))
    tl.store(row + RATIO, tl.sum(tl.where(valid, ratio, 0.0), axis=0))
    tl.store(row + RATIO_MIN, tl.min(tl.where(valid, ratio, float("inf")), axis=0))
    tl.store(row + RATIO_MAX, tl.max(tl.where(valid, ratio, -float("inf")), axis=0))
    tl.store(row + COUNT, tl.sum(valid.to(tl.float32), axis=0))
    bad_lp = valid_in & ~(tl.abs(lp) < float("inf"))
    tl.store(row + NONFINITE_LOGP, tl.sum(bad_lp.to(tl.float32), axis=0))
    if HAS_OLD:  # else old is logp, already counted
        bad_old = valid_in & ~(tl.abs(old) < float("inf"))
        tl.store(row + NONFINITE_OLD, tl.sum(bad_old.to(tl.float32), axis=0))
    else:
        tl.store(row + NONFINITE_OLD, 0.0)
    tl.store(row + NONFINITE_REF, tl.sum((valid_in & nonfinite_ref).to(tl.float32), axis=0))
    bad_adv = valid_in & ~(tl.abs(adv) < float("inf"))
    tl.store(row + NONFINITE_ADV, tl.sum(bad_adv.to(tl.float32), axis=0))
    if HAS_ROLLOUT:
        bad_rollout = valid_in & ~(tl.abs(rollout) < float("inf"))
        tl.store(row + NONFINITE_ROLLOUT, tl.sum(bad_rollout.to(tl.float32), axis=0))
    elif IS_W != 0:
        bad_w = valid_in & ~(tl.abs(w) < float("inf"))
        tl.store(row + NONFINITE_ROLLOUT, tl.sum(bad_w.to(tl.float32), axis=0))
    else:
        tl.store(row + NONFINITE_ROLLOUT, 0.0)


# Bytes moved per token (b = bytes per input element): forward reads logp, old_logp, ref_logp,
# rollout_logp and per-token advantages when given (b each), the mask (1) in the padded layout, and
# writes the gradient (b). Backward: nothing when grad_output is 1 and the counts were numbers (D
# folded into the stored gradient); otherwise it reads and writes the gradient once more (2b), as
# with local or tensor counts D is known only after the token pass. Per-sequence advantages,
# cu_seqlens and the stats are O(B). ~10 FLOPs a token: memory-bound everywhere.
def needs_seq_counts(cfg, num_seqs, max_len) -> bool:
    """Whether the denominator needs this call's own per-sequence counts: N_seqs (and L_max for
    the Dr. GRPO norm) when the caller gave none."""
    if not cfg.agg.startswith("seq-mean"):
        return False
    return num_seqs is None or (cfg.agg.endswith("norm") and max_len is None)


def policy_loss_triton(
    logp, old_logp, advantages, mask, cu_seqlens, ref_logp, rollout_logp, cfg, adv_per_token,
    need_seq_counts=True, grad_scale=1.0, rollout_is_weights=None, cov_select=None, per_token=False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple | None]:  # fmt: skip
    """The token pass: (grad like logp, partials [programs, NUM_STATS], seq_counts [B] or None,
    per-token (loss, KL, flags) like logp when ``per_token``, else None).

    Inputs are checked; ``adv_per_token`` is advantages_per_token's reading of the caller's
    layout; the stored gradient is multiplied by ``grad_scale``; ``rollout_is_weights`` per
    token or per sequence as [B, 1] (check_rollout_weights). policy_loss_finalize.py turns the
    rows into the loss and metrics.
    """
    packed = cu_seqlens is not None
    n = logp.numel()
    b = cu_seqlens.numel() - 1 if packed else logp.shape[0]
    length = 0 if packed else logp.shape[1]
    logp = logp.detach().contiguous()
    flat = [
        None if t is None else t.detach().contiguous()
        for t in (old_logp, advantages, ref_logp, rollout_logp, rollout_is_weights)
    ]
    old_logp, advantages, ref_logp, rollout_logp, is_w = flat
    if mask is not None:
        mask = mask.contiguous()
        mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    if packed:
        cu_seqlens = cu_seqlens.contiguous()

    def ptr(t: torch.Tensor | None) -> torch.Tensor:  # absent inputs: a valid, never-read pointer
        return logp if t is None else t

    seq_level = cfg.ratio_level == "sequence"
    per_seq_mean = cfg.agg == "seq-mean-token-mean"
    is_seq = rollout_logp is not None and cfg.is_level == "sequence"
    rs = ROLLOUT_RS.index(cfg.rollout_rs)  # 0: off, 1: token, 2: sequence, 3: geometric
    log_band = (math.log(cfg.rs_low), math.log(cfg.rs_high))
    # local counts under token rejection are the kept tokens: a sequence pass then too
    counts, lr_mean, seq_w = seq_stats_triton(
        logp, old_logp, mask, cu_seqlens, rollout_logp, cfg,
        seq_level or per_seq_mean or need_seq_counts or is_seq or rs >= 2,
    )  # fmt: skip

    grad = torch.empty_like(logp)
    tok = torch.empty(logp.shape if per_token else 0, dtype=compute_dtype(logp), device=logp.device)
    tokens = (tok, torch.empty_like(tok), torch.empty_like(tok, dtype=torch.uint8))  # per token
    cov_select = None if cov_select is None else cov_select.contiguous().view(torch.uint8)
    programs = max(1, triton.cdiv(n, _block(n)))
    partials = torch.empty((programs, NUM_STATS), dtype=torch.float32, device=logp.device)
    _policy_loss_fwd_kernel[(programs,)](
        logp, ptr(old_logp), advantages, ptr(mask), ptr(cu_seqlens),
        ptr(ref_logp), ptr(rollout_logp),
        logp if counts is None else counts, lr_mean, seq_w, ptr(is_w),
        ptr(cov_select),
        grad, partials,
        *tokens,
        n, length, b, (b - 1).bit_length(),
        float(cfg.eps_low), float(cfg.eps_high), float(cfg.dual_clip or 0.0),
        float(cfg.beta), math.inf if cfg.is_cap is None else float(cfg.is_cap),
        float(cfg.sapo_tau_pos), float(cfg.sapo_tau_neg), float(cfg.kl_cov_coef), *log_band,
        float(grad_scale),
        PACKED=packed, HAS_OLD=old_logp is not None,
        ADV_PER_TOKEN=adv_per_token, SEQ_LEVEL=seq_level,
        PER_SEQ_MEAN=per_seq_mean, HAS_DUAL=cfg.dual_clip is not None,
        HAS_ROLLOUT=rollout_logp is not None, IS_SEQ=is_seq, RS=rs,
        IS_W=0 if is_w is None else (2 if is_w.shape == logp.shape else 1),
        LOSS_TYPE=LOSS_TYPES.index(cfg.loss_type),
        KL_TYPE=KLS.index(cfg.kl) + 1 if cfg.uses_ref else 0,
        KL_RATIO=cfg.uses_ref and cfg.kl_ratio_correction, PER_TOKEN=per_token,
        NUM_STATS=NUM_STATS,
    )  # fmt: skip
    return grad, partials, counts, tokens if per_token else None


# ------------------------------------------------------------------------------------------------
# Every input policy_loss can hand the three launchers, for the ahead-of-time compile check
# (benchmarks/compile_check.py): each dimension's values, the heaviest (most registers) last. Token
# counts are the first of each _block size, and a multiple of 16 (Triton specializes on it).
LAUNCH_SPACE = {
    "dtype": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "kl": (None, *KLS),
    "agg": tuple(sorted(AGGS, key=lambda a: a == "seq-mean-token-mean")),
    "packed": (False, True),
    "tokens": (*tuple({_block(t): t for t in range(4096, 0, -1)}.values())[::-1], 4096),
    "seqs": (1, 5, 16),
    "old": (False, True),
    "adv_per_token": (False, True),
    # token level last: the corner then takes every switch below on (the other loss types and the
    # KL's ratio correction go with the token ratio only; example_launch drops them elsewhere)
    "ratio_level": tuple(sorted(RATIO_LEVELS, key=lambda level: level == "token")),
    "loss_type": tuple(sorted(LOSS_TYPES, key=lambda t: t == "ppo")),  # ppo: the dual clip's
    "kl_ratio": (False, True),
    "per_token": (False, True),
    "dual": (False, True),
    # rollout correction: none, the caller's weights (per sequence, per token), rollout_logp's
    # weight per token, with token rejection, per sequence with sequence / geometric rejection
    "rollout": ("off", "w-seq", "w-token", "token", "rs-token", "rs-sequence", "rs-geometric"),
    "mask": (torch.float32, torch.int64, torch.bool),
    "cu_seqlens": (torch.int64, torch.int32),
    "counts": ("given", "tensors", "local"),
    "aligned": (False, True),
}
HEAVY_DIMS = ("dtype", "kl", "agg")  # compiled in every combination, the other dimensions heaviest


def example_launch(
    dtype, kl, agg, packed, tokens, seqs, old, adv_per_token, ratio_level, loss_type, kl_ratio,
    per_token, dual, rollout, mask, cu_seqlens, counts, aligned,
) -> None:  # fmt: skip
    """The launches policy_loss makes at one point of LAUNCH_SPACE, on CPU tensors (the compile
    check records them instead of running them); not aligned: the caller's tensors are slices.
    A loss type other than ppo takes the token ratio and no dual clip (PolicyLossConfig's rule),
    as does the KL's ratio correction."""
    token = ratio_level == "token"
    loss_type = loss_type if token else "ppo"
    cfg = PolicyLossConfig(
        beta=0.0 if kl is None else 0.1, kl=kl or "k3", ratio_level=ratio_level, agg=agg,
        dual_clip=3.0 if dual and loss_type == "ppo" else None, loss_type=loss_type,
        kl_ratio_correction=kl_ratio and token,
        rollout_rs=rollout[3:] if rollout[:3] == "rs-" and loss_type not in COV_TYPES else None,
        is_level="sequence" if rollout in ("rs-sequence", "rs-geometric") else "token",
    )  # fmt: skip
    length = -(-tokens // seqs)
    shape = (tokens,) if packed else (seqs, length)
    given = lambda on, s=shape, d=dtype: at_offset(torch.zeros(s, dtype=d), aligned) if on else None
    logp, adv = given(True), given(True, shape if adv_per_token else (seqs,))
    cu = torch.linspace(0, tokens, seqs + 1).to(cu_seqlens)
    m, cu = (None, given(True, cu.shape, cu_seqlens)) if packed else (given(True, d=mask), None)
    num = (None,) * 3 if counts == "local" else (tokens, seqs, length)
    num = tuple(map(torch.tensor, num)) if counts == "tensors" else num
    inv = folded_inv_denom(cfg, *num)
    w = given(rollout[:2] == "w-", shape if rollout == "w-token" else (seqs, 1))
    select = given(loss_type in COV_TYPES, d=torch.bool)
    grad, *_ = policy_loss_triton(
        logp, given(old), adv, m, cu, given(kl is not None),
        given(rollout not in ("off", "w-seq", "w-token")), cfg, adv_per_token,
        needs_seq_counts(cfg, *num[1:]), 1.0 if inv is None else inv, w, select, per_token,
    )  # fmt: skip
