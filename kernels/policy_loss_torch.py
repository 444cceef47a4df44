"""The GRPO-family token loss in plain PyTorch: the CPU path of ``policy_loss``, written for speed.

It is not the spec: docs/design.md ("The policy loss") states the formulas and policy_loss_ref.py
writes them out to be read; the tests hold this path to that reference. It computes what the
Triton kernels in policy_loss_triton.py compute, with the same three outputs, so that both
backends share one autograd.Function and one finalization:

- ``grad``: d(Σ_t c_t·loss_t)/d logp_t per token, where c_t is the token's share before the global
  denominator (1 for a valid token, or 1/|y_i| under "seq-mean-token-mean"; 0 for a masked one),
  times ``grad_scale`` (1 / D when the counts are numbers: the backward then has less to do);
- ``stats``: the sums the loss and its metrics are made of (the named slots below);
- ``seq_counts``: valid tokens per sequence, for the local N_seq and L_max;
- ``tokens`` (only when asked, else None): per token, in logp's layout, the loss ℓ_t [compute
  dtype], KL_t [compute dtype] and the flags [uint8, FLAG_* bits], each 0 at masked positions.

Per token t of sequence i, with A the advantage, the gradients it forms without autograd:
  ratio      d ρ_t / d logp_t = ρ_t, at token and at sequence level (GSPO, verl's
             logp − sg(logp) + sg(mean) form: docs/design.md, "GSPO with rollout weights")
  pg  ppo    −ρ·A, or −clip(ρ)·A with no gradient when clipped:
             high: ρ > 1 + eps_high and A > 0;  low: ρ < 1 − eps_low and A < 0
      cispo  −sg(clip(ρ, 1 − eps_low, 1 + eps_high))·A·logp (d: −clip(ρ)·A), clipped for any A
      sapo   −A·g, g = σ(τ(ρ − 1))·4/τ, τ = sapo_tau_pos if A > 0 else sapo_tau_neg
             (d: −A·4σ(1 − σ)·ρ)
      gpg    −A·logp (d: −A)
      clip_cov  ppo's, and 0 (d: 0) at the selected tokens (policy_loss_cov.py)
      kl_cov −ρ·A, unclipped, plus kl_cov_coef·|logp − old| at the selected tokens
             (d: −ρ·A + kl_cov_coef·sign(logp − old))
  dual clip  A < 0 and pg > −c·A → pg = −c·A, no gradient (ppo only)
  rollout    w_t = min(exp(old_t − rollout_t), is_cap), detached, multiplies pg (not the KL term);
             is_level="sequence": one w_i = min(exp(clamp(Σ_t old_t − rollout_t, ±20)), is_cap);
             rollout_is_weights: the caller's weights as given; rollout_rs: rejected tokens leave
             the mask (``rollout_kept``)
  KL         δ = logp − ref: k1 δ (d 1), k2 δ²/2 (d δ), k3 e^−δ + δ − 1 (d 1 − e^−δ), abs |δ|
             (d sign δ), k3+ k3's value with k2's gradient (d δ); kl_ratio_correction: ρ·KL
             (d ρ·(KL + d KL))
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._backend import Slot, compute_dtype
from .loss_config import PolicyLossConfig

# The stats vector: this path writes one, the Triton kernel one row per program (summed, and min /
# max for the ratio's). Each slot holds a sum over the valid tokens; the finalization turns it into
# the metric in the slot of the same name: LOSS the loss, CLIP_LOW .. RATIO means over the valid
# tokens (divided by COUNT), RATIO_MIN / RATIO_MAX 0 when no token is valid, the rest as they are.
LOSS = Slot(0)  # sum of c_t * loss_t, c_t the token's share before the global denominator
CLIP_LOW = Slot(1)  # tokens clipped at 1 - eps_low (A < 0)
CLIP_HIGH = Slot(2)  # tokens clipped at 1 + eps_high (A > 0)
DUAL_CLIP = Slot(3)  # tokens bounded by the dual clip (A < 0)
KL = Slot(4)  # sum of KL_t (0 when beta == 0)
RATIO = Slot(5)  # sum of the ratios (the sequence ratio at sequence level)
RATIO_MIN = Slot(6)  # the smallest ratio (rows combine by min)
RATIO_MAX = Slot(7)  # the largest ratio (rows combine by max)
COUNT = Slot(8)  # valid tokens
# Non-finite values among the valid tokens, one slot per input read.
NONFINITE_LOGP = Slot(9)
NONFINITE_OLD = Slot(10)
NONFINITE_REF = Slot(11)
NONFINITE_ADV = Slot(12)
NONFINITE_ROLLOUT = Slot(13)
CHECKED = {  # the argument named by check_finite's error -> its slot
    "logp": NONFINITE_LOGP,
    "old_logp": NONFINITE_OLD,
    "ref_logp": NONFINITE_REF,
    "advantages": NONFINITE_ADV,
    "rollout_logp": NONFINITE_ROLLOUT,
}
NUM_METRICS = NONFINITE_ROLLOUT + 1  # the slots in use: the finalized vector's length
NUM_STATS = 16  # a kernel row's width, padded to a power of two for its stores
# Log-ratios of the rollout correction are held to [-20, 20] before they are exponentiated (the
# sequence weight) or compared (rejection): verl's SAFETY_BOUND.
LOG_RATIO_BOUND = 20.0


def rollout_kept(
    log_w: torch.Tensor,  # [B, L] or [T]: old_logp - rollout_logp, in the compute dtype
    valid: torch.Tensor | None,  # [B, L] bool, or None when every token is valid (packed)
    seq_sum,  # [B, L] | [T] -> [B]: the sum over each sequence
    expand,  # [B] -> broadcastable like log_w
    seq_counts: torch.Tensor,  # [B] valid tokens per sequence
    cfg: PolicyLossConfig,
) -> torch.Tensor:
    """The tokens rollout rejection keeps (``cfg.rollout_rs``), like log_w; valid or not. A NaN
    statistic is rejected (check_finite names its input)."""
    clamped = log_w.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    if cfg.rollout_rs == "token":
        stat = clamped
    else:  # the log of the sequence's product of token ratios, or of their geometric mean
        stat = seq_sum(clamped if valid is None else torch.where(valid, clamped, 0.0))
        stat = expand(stat / seq_counts.clamp(min=1) if cfg.rollout_rs == "geometric" else stat)
    return (stat >= math.log(cfg.rs_low)) & (stat <= math.log(cfg.rs_high))


# The bits of the per-token flags (``per_token`` outputs), the same on both backends.
FLAG_CLIP_LOW = Slot(1)  # clipped at 1 - eps_low
FLAG_CLIP_HIGH = Slot(2)  # clipped at 1 + eps_high
FLAG_DUAL = Slot(4)  # bounded by the dual clip


class PerTokenOutputs(NamedTuple):
    """Each token's terms before the aggregation, in logp's layout ([B, L] or [T]), detached, 0 /
    False at masked positions (liger-kernel's ``reduce=False`` outputs, and the flags apart).

    Aggregating ``loss`` as ``agg`` says (policy_loss.py's docstring) gives PolicyLossOutput.loss.
    """

    loss: torch.Tensor  # float32 (float64 for float64 logp): loss_t = w·pg + beta·KL_t
    kl: torch.Tensor  # float32 (float64): KL_t as in the loss (0 when beta == 0)
    clip_low: torch.Tensor  # bool: clipped at 1 - eps_low (as counted by clip_frac_low)
    clip_high: torch.Tensor  # bool: clipped at 1 + eps_high (as counted by clip_frac_high)
    dual_clip: torch.Tensor  # bool: bounded by the dual clip
    cov_select: torch.Tensor | None  # bool: clip_cov / kl_cov's selected tokens; None otherwise


def per_token_outputs(loss, kl, flags, cov_select=None) -> PerTokenOutputs:
    """PerTokenOutputs of a token pass's (loss, kl, flags), the flags' bits apart as bools."""
    bits = [flags & bit != 0 for bit in (FLAG_CLIP_LOW, FLAG_CLIP_HIGH, FLAG_DUAL)]
    return PerTokenOutputs(loss, kl, *bits, cov_select)


def advantages_per_token(advantages: torch.Tensor, logp: torch.Tensor, num_seqs: int) -> bool:
    """Per token or per sequence, from the shapes in the caller's layout, never from counts.

    Padded (logp [B, L]): 2-D advantages are per token, 1-D per sequence. Packed (logp [T]): a
    1-D tensor of B values is per sequence, anything else per token. A packed [T] with T == B is
    the one shape both readings fit: it is read per sequence. The readings differ only when some
    sequence is empty (T == B with every length >= 1 means every length is 1).
    """
    if logp.dim() == 2:
        return advantages.dim() == 2
    return not (advantages.dim() == 1 and advantages.numel() == num_seqs)


def check_rollout_weights(
    weights, logp: torch.Tensor, num_seqs: int, rollout_logp, cfg: PolicyLossConfig
) -> torch.Tensor | None:
    """policy_loss's ``rollout_is_weights``, checked: like logp (per token), or [B] / [B, 1] (per
    sequence; a packed [T] with T == B is read per sequence, as the advantages are). Returns them
    per token, or per sequence as [B, 1]; a ValueError naming what is wrong."""
    if weights is None:
        return None
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        got = weights.dtype if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise ValueError(f"rollout_is_weights must be a floating-point tensor, got {got}")
    if rollout_logp is not None:
        raise ValueError(
            "pass rollout_logp (the weights are computed, truncated at is_cap) or "
            "rollout_is_weights (used as given), not both"
        )
    if cfg.rollout_rs is not None:
        raise ValueError(f"rollout_rs={cfg.rollout_rs!r} reads rollout_logp: pass it instead of "
                         "rollout_is_weights")  # fmt: skip
    if weights.shape in ((num_seqs,), (num_seqs, 1)):
        return weights.reshape(num_seqs, 1)
    if weights.shape == logp.shape:
        return weights
    raise ValueError(
        f"rollout_is_weights has shape {tuple(weights.shape)}, expected [{num_seqs}] or "
        f"[{num_seqs}, 1] (per sequence) or logp's {tuple(logp.shape)} (per token)"
    )


def policy_loss_torch(
    logp: torch.Tensor,  # [B, L] or [T]
    old_logp: torch.Tensor | None,  # like logp
    advantages: torch.Tensor,  # [B] or like logp
    mask: torch.Tensor | None,  # [B, L] (padded layout)
    cu_seqlens: torch.Tensor | None,  # [B + 1] (packed layout)
    ref_logp: torch.Tensor | None,  # like logp
    rollout_logp: torch.Tensor | None,  # like logp
    cfg: PolicyLossConfig,
    adv_per_token: bool,  # advantages_per_token's reading, made in the caller's layout
    grad_scale: float = 1.0,  # the gradient's factor: 1 / D when the counts are numbers
    rollout_is_weights: torch.Tensor | None = None,  # [B] per sequence or like logp
    cov_select: torch.Tensor | None = None,  # like logp, bool: clip_cov / kl_cov's tokens
    per_token_out: bool = False,  # also return the per-token loss, KL and flags
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple | None]:
    """(grad like logp in logp's dtype, stats [NUM_STATS], seq_counts [B], tokens) of checked
    inputs; the gradient is multiplied by ``grad_scale`` where the clip mask is applied (no pass
    of its own, but where an input is not finite). ``tokens``: (loss, kl, flags) like logp when
    ``per_token_out``, else None.

    Few passes over the tokens, as this is the CPU path: per-sequence values stay [B] until they
    broadcast; masked positions are never cleaned, what leaves is masked instead, by multiplying
    with the float mask when every intermediate is finite everywhere (one sum each tells) and with
    torch.where otherwise (masked garbage, or non-finite inputs that must be counted).
    """
    cdt = compute_dtype(logp)
    dev = logp.device
    n = logp.numel()
    zero = torch.zeros((), dtype=cdt, device=dev)
    if cu_seqlens is None:  # padded [B, L]: per-sequence values broadcast as [B, 1]
        b = logp.shape[0]
        valid = mask if mask.dtype == torch.bool else mask != 0  # [B, L]
        expand = lambda v: v[:, None]
        seq_sum = lambda x: x.sum(-1)
        seq_counts = valid.sum(-1).to(cdt)  # [B]
    else:  # packed [T], every token valid
        b = cu_seqlens.numel() - 1
        lens = cu_seqlens[1:] - cu_seqlens[:-1]  # [B]
        valid = None
        expand = lambda v: torch.repeat_interleave(v, lens, output_size=n)
        seq_sum = lambda x: (  # float64: index_add_ accumulates one token at a time
            torch.zeros(b, dtype=torch.float64, device=dev)
            .index_add_(0, expand(torch.arange(b, device=dev)), x.double())
            .to(x.dtype)
        )
        seq_counts = lens.to(cdt)

    def sums(*ts: torch.Tensor | None) -> list[torch.Tensor]:  # non-finite iff some value is
        return [t.sum() for t in ts if t is not None]  # (or the sum overflows: errs to "no")

    fast = False  # until all_finite says so
    mask_f = None if valid is None else valid.to(cdt)

    def masked(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:  # x where valid, else 0
        if valid is None:
            return x
        if fast:
            return x.mul_(mask_f) if inplace else x * mask_f
        return torch.where(valid, x, 0.0)

    def keep_unless(flags: torch.Tensor, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """where(flags, 0, x) * scale; x: ours to overwrite."""
        if scale == 1.0:
            return x.mul_(~flags) if fast else torch.where(flags, 0.0, x)
        if fast:  # the scale rides on the mask's multiply
            return x.mul_(torch.where(flags, zero, scale))
        return torch.where(flags, 0.0, x.mul_(scale))

    def count(flags: torch.Tensor) -> torch.Tensor:
        return (flags if valid is None else flags & valid).sum().to(cdt)

    lp = logp.detach().to(cdt)
    old = lp if old_logp is None else old_logp.detach().to(cdt)
    adv = advantages.detach().to(cdt)
    per_token = adv_per_token
    neg_adv = -adv if per_token else expand(-adv)  # [B, L] | [B, 1] | [T]
    log_ratio = torch.zeros_like(lp) if old_logp is None else lp - old
    log_w = None if rollout_logp is None else old - rollout_logp.detach().to(cdt)
    valid_in, given_w = valid, None  # the caller's mask: non-finite inputs are counted over it
    if cfg.rollout_rs is not None:  # rejected tokens leave the mask, and the local counts
        kept = rollout_kept(log_w, valid, seq_sum, expand, seq_counts, cfg)
        valid = kept if valid is None else valid & kept
        mask_f = valid.to(cdt)
        seq_counts = seq_sum(mask_f) if cu_seqlens is not None else mask_f.sum(-1)
    if log_w is not None and cfg.is_level == "sequence":  # one weight per sequence: [B] → tokens
        total = seq_sum(log_w if valid_in is None else torch.where(valid_in, log_w, 0.0))
        log_w = expand(total.clamp_(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    if rollout_is_weights is not None:  # the caller's, as given
        given_w = rollout_is_weights.detach().to(cdt)
        given_w = given_w if given_w.shape == lp.shape else expand(given_w.reshape(b))
    delta = lp - ref_logp.detach().to(cdt) if cfg.uses_ref else None
    abs_lr = (lp - old).abs_() if cfg.loss_type == "kl_cov" else None  # before exp_ below
    uses_logp = cfg.loss_type in ("cispo", "gpg")  # their loss holds logp itself
    input_sums = sums(log_ratio, neg_adv, log_w, delta, lp if uses_logp else None, given_w)
    if cfg.ratio_level == "sequence":
        seq_mean = seq_sum(masked(log_ratio)) / seq_counts.clamp(min=1)  # [B]
        ratio = torch.exp(expand(seq_mean)).expand_as(lp)  # [B, 1] → [B, L] view when padded
    else:
        ratio = log_ratio.exp_()  # in place: every new [T] buffer costs page faults on the CPU
    w = given_w if log_w is None else log_w.exp_()
    e = torch.exp(-delta) if cfg.uses_ref and cfg.kl in ("k3", "k3+") else None
    # Finite everywhere: every input is finite at every valid token (all non-finite counts are 0)
    # and nothing overflows, so masking may multiply. One host sync.
    fast = bool(torch.isfinite(torch.stack(input_sums + sums(ratio, w, e))).all())

    lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
    clipped = None  # tokens whose ratio was clipped (ppo: where it binds; cispo: any A)
    if cfg.loss_type in ("ppo", "clip_cov"):
        pg_unclipped = (
            ratio * neg_adv
        )  # = d pg / d logp where not clipped (d ratio / d logp = ratio)
        pg_clipped = ratio.clamp(lo, hi).mul_(neg_adv)
        clipped = pg_clipped > pg_unclipped  # high: ratio > hi, A > 0; low: ratio < lo, A < 0
        pg = torch.maximum(pg_unclipped, pg_clipped, out=pg_clipped)
        dloss = keep_unless(clipped, pg_unclipped, grad_scale)
        if cov_select is not None:  # clip_cov: loss 0, gradient 0
            pg = pg.masked_fill_(cov_select, 0.0)
            dloss = dloss.masked_fill_(cov_select, 0.0)
    elif cfg.loss_type == "kl_cov":  # -ratio * A, plus coef * |logp - old| where selected
        pg = ratio * neg_adv
        dloss = pg * grad_scale
        sel = cov_select.to(cdt)
        pg = pg.addcmul_(sel, abs_lr, value=cfg.kl_cov_coef)
        slope = (lp - old).sign_().mul_(sel)  # d |logp - old| / d logp, where selected
        dloss = dloss.add_(slope, alpha=cfg.kl_cov_coef * grad_scale)
    elif cfg.loss_type == "cispo":  # pg = -sg(clip(ratio)) * A * logp, d pg / d logp = the rest
        dloss = ratio.clamp(lo, hi).mul_(neg_adv)
        clipped = (ratio < lo) | (ratio > hi)
        pg = dloss * lp
        dloss = dloss.mul_(grad_scale) if grad_scale != 1.0 else dloss
    elif cfg.loss_type == "sapo":  # pg = -A * g, g = sigmoid(tau (ratio - 1)) * 4 / tau
        taus = neg_adv.new_tensor([cfg.sapo_tau_pos, cfg.sapo_tau_neg])  # in cdt, not float32
        tau = torch.where(neg_adv < 0, taus[0], taus[1])  # A > 0: tau_pos
        gate = torch.sigmoid(tau * (ratio - 1.0))
        pg = (4.0 / tau) * gate * neg_adv
        # d g / d logp = 4 * gate * (1 - gate) * ratio (d ratio / d logp = ratio)
        dloss = gate.mul_(1.0 - gate).mul_(ratio).mul_(neg_adv).mul_(4.0 * grad_scale)
    else:  # gpg: pg = -A * logp
        dloss = neg_adv.expand_as(lp) * grad_scale
        pg = neg_adv * lp
    n_dual = zero
    if cfg.dual_clip is not None:  # bound -c·A where A < 0, +inf elsewhere
        neg = -adv
        bound = torch.where(neg > 0, cfg.dual_clip * neg, math.inf)
        bound = bound if per_token else expand(bound)
        dual = pg > bound
        pg = torch.minimum(pg, bound, out=pg)
        dloss = keep_unless(dual, dloss)
        n_dual = count(dual)
    if w is not None:
        w = w if cfg.is_cap is None or given_w is not None else w.clamp_(max=cfg.is_cap)
        pg.mul_(w)
        dloss.mul_(w)
    loss, kl_sum = pg, zero
    if cfg.uses_ref:
        if cfg.kl == "k1":
            kl, dkl = delta, 1.0
        elif cfg.kl == "k2":
            kl, dkl = 0.5 * delta * delta, delta
        elif cfg.kl == "abs":
            kl, dkl = delta.abs(), delta.sign()
        else:  # k3, and k3+ with k2's gradient
            kl, dkl = e + delta - 1.0, (1.0 - e if cfg.kl == "k3" else delta)
        if cfg.kl_ratio_correction:  # d (ratio·KL) / d logp = ratio·(KL + d KL)
            dkl = ratio * (kl + dkl)
            kl = kl * ratio
        loss = loss.add_(kl, alpha=cfg.beta)
        slope = cfg.beta * grad_scale  # the KL's share of the scaled gradient
        dloss = dloss.add_(dkl, alpha=slope) if torch.is_tensor(dkl) else dloss.add_(slope)
        kl_sum = masked(kl).sum()

    loss = masked(loss, inplace=True)  # loss_t, 0 at masked positions
    tokens = None
    if per_token_out:
        kl_t = masked(kl) if cfg.uses_ref else torch.zeros_like(lp)
        flags = torch.zeros(lp.shape, dtype=torch.uint8, device=dev)
        if clipped is not None:
            clip_t = clipped if valid is None else clipped & valid
            high = clip_t & (ratio > 1.0)
            flags += high * FLAG_CLIP_HIGH + (clip_t & ~high) * FLAG_CLIP_LOW
        if cfg.dual_clip is not None:
            flags += (dual if valid is None else dual & valid) * FLAG_DUAL
        tokens = (loss, kl_t, flags)
    if cfg.agg == "seq-mean-token-mean":  # c_t = 1 / |y_i|
        inv_len = 1.0 / seq_counts.clamp(min=1)  # [B]
        grad = masked(dloss.mul_(expand(inv_len)), inplace=True)
        loss_sum = (seq_sum(loss) * inv_len).sum()
    else:  # c_t = 1
        grad = masked(dloss, inplace=True)
        loss_sum = loss.sum()
    grad = grad.to(logp.dtype)

    n_clip = n_high = zero
    if clipped is not None:
        clipped = clipped if valid is None else clipped & valid
        n_clip = clipped.sum().to(cdt)
        n_high = (clipped & (ratio > 1.0)).sum().to(cdt)  # ratio > 1: clipped at 1 + eps_high
    ratio_masked = masked(ratio)
    ratio_sum = ratio_masked.sum()
    ratio_min = ratio_max = zero
    if n and (valid is None or fast):
        ratio_max = ratio_masked.max()  # ratio >= 0: masked zeros never win
        if valid is None:
            ratio_min = ratio.min()
        else:  # masked positions pushed to the largest float, valid ones untouched (+ 0)
            ratio_min = ratio_masked.add_((1.0 - mask_f).mul_(torch.finfo(cdt).max)).min()
    elif n:
        ratio_min = torch.where(valid, ratio, math.inf).min()
        ratio_max = torch.where(valid, ratio, -math.inf).max()
    slots = {
        LOSS: loss_sum,
        CLIP_LOW: n_clip - n_high,
        CLIP_HIGH: n_high,
        DUAL_CLIP: n_dual,
        KL: kl_sum,
        RATIO: ratio_sum,
        RATIO_MIN: ratio_min,
        RATIO_MAX: ratio_max,
        COUNT: seq_counts.sum(),
    }
    if not fast:  # rare: name the culprits, one count each, over the caller's mask
        read = {
            NONFINITE_LOGP: lp,
            NONFINITE_OLD: old_logp,
            NONFINITE_REF: ref_logp if cfg.uses_ref else None,
            NONFINITE_ADV: neg_adv,
            NONFINITE_ROLLOUT: rollout_logp if given_w is None else given_w,
        }
        valid = valid_in
        slots |= {k: count(~torch.isfinite(t)) for k, t in read.items() if t is not None}
    stats = torch.stack([slots.get(k, zero) for k in range(NUM_STATS)])  # one op, in slot order
    return grad, stats, seq_counts, tokens
