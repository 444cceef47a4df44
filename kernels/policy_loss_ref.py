"""The policy loss written to be read: the reference that ``policy_loss`` is tested against.

    policy_loss_ref(logp, old_logp, advantages, mask, ...) -> PolicyLossOutput

Eager PyTorch on the padded layout, one formula a line, as docs/design.md ("The policy loss")
states them: per-token terms (``policy_loss_terms_ref``), then the aggregation
(``aggregate_ref``), then the metrics. Nothing here is fused, chunked or written for speed; the
gradient is autograd's. It computes in logp's dtype (every other input is cast to it): in float64
it is the oracle; the same formula in a lower dtype measures that dtype's own rounding, of which
the tests' tolerances are made (docs/design.md, "Testing rules").

The settings are PolicyLossConfig's, taken the way ``policy_loss`` takes them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .loss_config import PolicyLossConfig
from .policy_loss import Count, PolicyLossOutput


class PolicyLossTerms(NamedTuple):
    """Each token's terms before the aggregation, all [B, L] (masked positions hold garbage)."""

    loss: torch.Tensor  # w * pg + beta * KL_t; differentiable w.r.t. logp
    ratio: torch.Tensor  # rho, or the sequence's s_i at sequence level (detached)
    clip_low: torch.Tensor  # bool: clipped at 1 - eps_low (A < 0)
    clip_high: torch.Tensor  # bool: clipped at 1 + eps_high (A > 0)
    dual_clip: torch.Tensor  # bool: bounded at -c * A by the dual clip (A < 0)
    kl: torch.Tensor  # KL_t as in the loss (0 when beta == 0: ref_logp is not read), detached
    kept: torch.Tensor  # bool: the mask after rollout rejection (the mask itself when it is off)
    cov_select: torch.Tensor | None  # bool: clip_cov / kl_cov's selected tokens; None otherwise


# Log-ratios of the rollout correction are held to [-20, 20] before they are exponentiated or
# compared (verl's SAFETY_BOUND): the sequence weight, and every rejection statistic.
LOG_RATIO_BOUND = 20.0


def rollout_kept_ref(
    old: torch.Tensor, rollout_logp: torch.Tensor | None, mask: torch.Tensor, cfg
) -> torch.Tensor:
    """[B, L] bool: the valid tokens that rollout rejection keeps (``cfg.rollout_rs``)."""
    valid = mask != 0
    if cfg.rollout_rs is None:
        return valid
    m = mask.to(old.dtype)
    log_w = (old - rollout_logp.to(old.dtype)).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    if cfg.rollout_rs == "token":
        stat = log_w
    else:  # the product of the sequence's token ratios, or its geometric mean
        stat = (log_w * m).sum(-1)
        stat = stat / m.sum(-1).clamp(min=1) if cfg.rollout_rs == "geometric" else stat
        stat = stat[:, None]
    return valid & (stat >= math.log(cfg.rs_low)) & (stat <= math.log(cfg.rs_high))


def cov_selection_ref(
    logp: torch.Tensor, old_logp: torch.Tensor | None, a: torch.Tensor, mask: torch.Tensor,
    cfg: PolicyLossConfig, cov_keys: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    """clip_cov / kl_cov's selected tokens [B, L] bool, step by step as verl selects them, in
    float64 (policy_loss_cov.py): ``a`` the advantages [B, L]; ``cov_keys`` [B, L] clip_cov's
    random keys, the candidates of the smallest keys chosen (verl: a random permutation)."""
    valid = mask != 0
    lp, a = logp.detach().double(), a.detach().double()
    cov = (a - a[valid].mean()) * (lp - lp[valid].mean())  # masked positions: unused
    n = int(valid.sum())
    select = torch.zeros_like(valid)
    if cfg.loss_type == "kl_cov":  # the top k by covariance
        if n > 0:
            top = torch.topk(cov[valid], max(1, int(n * cfg.kl_cov_ratio))).indices
            rows, cols = valid.nonzero()[top].unbind(-1)
            select[rows, cols] = True
        return select
    old = lp if old_logp is None else old_logp.double()
    ratio = torch.exp(lp - old)
    clipped = ((ratio > 1 + cfg.eps_high) & (a > 0)) | ((ratio < 1 - cfg.eps_low) & (a < 0))
    band = valid & ~clipped & (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub)
    rows, cols = band.nonzero().unbind(-1)
    k = min(max(1, int(n * cfg.clip_cov_ratio)), rows.numel())
    chosen = torch.argsort(cov_keys[rows, cols], stable=True)[:k]
    select[rows[chosen], cols[chosen]] = True
    return select


def policy_loss_terms_ref(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    rollout_is_weights: torch.Tensor | None = None,
    config: PolicyLossConfig | None = None,
    cov_keys: torch.Tensor | None = None,
    **settings,
) -> PolicyLossTerms:
    """The per-token loss [B, L] in logp's dtype, and its flags [B, L] bool; arguments as in
    ``policy_loss_ref``."""
    cfg = PolicyLossConfig.resolve(config, settings)
    dtype = logp.dtype
    m = mask.to(dtype)
    old = logp.detach() if old_logp is None else old_logp.to(dtype)  # None: on-policy
    a = advantages.to(dtype)
    a = a[:, None].expand_as(logp) if a.dim() == 1 else a  # one per sequence, or per token

    kept = rollout_kept_ref(old, rollout_logp, mask, cfg)  # rejected tokens leave the mask
    m_kept = kept.to(dtype)
    log_ratio = logp - old
    if cfg.ratio_level == "sequence":  # GSPO: s_i = exp(masked mean), d s_i / d logp_t = s_i
        seq_mean = (log_ratio * m_kept).sum(-1) / m_kept.sum(-1).clamp(min=1)
        log_ratio = logp - logp.detach() + seq_mean.detach()[:, None]
    ratio = torch.exp(log_ratio)

    lo, hi = 1 - cfg.eps_low, 1 + cfg.eps_high
    r = ratio.detach()
    no_clip = torch.zeros_like(r, dtype=torch.bool)
    select = None
    if cfg.loss_type in ("clip_cov", "kl_cov"):
        select = cov_selection_ref(logp, old_logp, a, mask, cfg, cov_keys)
    if cfg.loss_type in ("ppo", "clip_cov"):
        pg = torch.maximum(-a * ratio, -a * torch.clamp(ratio, lo, hi))
        clip_low, clip_high = (r < lo) & (a < 0), (r > hi) & (a > 0)
        if select is not None:  # clip_cov: the selected tokens' loss is 0
            pg = torch.where(select, 0.0, pg)
    elif cfg.loss_type == "kl_cov":  # the unclipped ratio, and |log-ratio| on the selected tokens
        pg = -a * ratio + cfg.kl_cov_coef * select * (logp - old).abs()
        clip_low, clip_high = no_clip, no_clip
    elif cfg.loss_type == "cispo":  # the weight clipped for any A, detached; the gradient via logp
        pg = -torch.clamp(r, lo, hi) * a * logp
        clip_low, clip_high = r < lo, r > hi
    elif cfg.loss_type == "sapo":  # a sigmoid gate instead of the clip, 1 at ratio 1 for any tau
        tau = torch.where(a > 0, a.new_tensor(cfg.sapo_tau_pos), a.new_tensor(cfg.sapo_tau_neg))
        pg = -a * torch.sigmoid(tau * (ratio - 1)) * 4 / tau
        clip_low, clip_high = no_clip, no_clip
    else:  # gpg: no ratio
        pg = -a * logp
        clip_low, clip_high = no_clip, no_clip
    dual = torch.zeros_like(clip_low)
    if cfg.dual_clip is not None:
        dual = (a < 0) & (pg.detach() > -cfg.dual_clip * a)
        pg = torch.where(dual, -cfg.dual_clip * a, pg)
    if rollout_logp is not None:  # truncated importance weight, detached; not on the KL term
        log_w = old - rollout_logp.to(dtype)
        if cfg.is_level == "sequence":  # one per sequence: the product over its valid tokens
            bound = LOG_RATIO_BOUND
            log_w = (log_w * m).sum(-1).clamp(-bound, bound)[:, None]
        w = torch.exp(log_w).detach()
        pg = pg * (w if cfg.is_cap is None else w.clamp(max=cfg.is_cap))
    elif rollout_is_weights is not None:  # the caller's weights, as given: [B], [B, 1], [B, L]
        w = rollout_is_weights.to(dtype).detach()
        pg = pg * (w[:, None] if w.dim() == 1 else w)

    kl = torch.zeros_like(logp)
    if cfg.uses_ref:
        delta = logp - ref_logp.to(dtype)
        k2, k3 = 0.5 * delta**2, torch.exp(-delta) + delta - 1
        kl = {
            "k1": delta,
            "k2": k2,
            "k3": k3,
            "abs": delta.abs(),
            "k3+": k2 - k2.detach() + k3.detach(),  # k3's value, k2's gradient
        }[cfg.kl]
        if cfg.kl_ratio_correction:  # the token ratio, not detached
            kl = kl * ratio
    loss = pg + cfg.beta * kl if cfg.uses_ref else pg
    loss = torch.where(kept, loss, 0.0)
    return PolicyLossTerms(loss, r, clip_low, clip_high, dual, kl.detach(), kept, select)


def aggregate_ref(
    values: torch.Tensor,
    mask: torch.Tensor,
    agg: str,
    *,
    num_tokens: Count | None = None,
    num_seqs: Count | None = None,
    max_len: Count | None = None,
) -> torch.Tensor:
    """The aggregation of docs/design.md ("Aggregation", "Global counts") of per-token
    ``values`` [B, L] (any float dtype) into a 0-dim tensor of that dtype; ``mask`` [B, L]. The
    counts default to this batch's own; with no valid token at all they are 1, so that the loss is
    0, not NaN."""
    m = mask.to(values.dtype)
    lens = m.sum(-1)  # [B] valid tokens per sequence
    n_tok = lens.sum().clamp(min=1) if num_tokens is None else num_tokens
    n_seq = (lens > 0).sum().clamp(min=1) if num_seqs is None else num_seqs
    l_max = lens.max().clamp(min=1) if max_len is None else max_len
    per_seq = (values * m).sum(-1)  # [B]
    if agg == "token-mean":
        return per_seq.sum() / n_tok
    if agg == "seq-mean-token-mean":
        return (per_seq / lens.clamp(min=1)).sum() / n_seq
    if agg == "seq-mean-token-sum":
        return per_seq.sum() / n_seq
    if agg == "seq-mean-token-sum-norm":
        return per_seq.sum() / (n_seq * l_max)
    if agg == "token-sum":
        return per_seq.sum()
    raise ValueError(f"agg must be one of {PolicyLossConfig.CHOICES['agg']}, got {agg!r}")


def policy_loss_ref(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    rollout_is_weights: torch.Tensor | None = None,
    num_tokens: Count | None = None,
    num_seqs: Count | None = None,
    max_len: Count | None = None,
    config: PolicyLossConfig | None = None,
    cov_keys: torch.Tensor | None = None,
    **settings,
) -> PolicyLossOutput:
    """``policy_loss`` on the padded layout, eagerly, in logp's dtype.

    Args:
        logp: [B, L] any float dtype, the dtype of every computation here; the loss is
            differentiable w.r.t. it.
        old_logp, ref_logp, rollout_logp: [B, L] or None, as in ``policy_loss``.
        rollout_is_weights: [B], [B, 1] or [B, L] or None, as in ``policy_loss``.
        advantages: [B] per sequence or [B, L] per token.
        mask: [B, L], nonzero = valid token. Masked positions must hold finite values (they are
            multiplied by 0).
        num_tokens, num_seqs, max_len, config, **settings: as in ``policy_loss``.
        cov_keys: [B, L] float64, clip_cov's random keys (``cov_selection_ref``).

    Returns:
        PolicyLossOutput: the loss and the metrics over the valid tokens (0-dim, logp's dtype;
        fractions and means 0 when no token is valid).
    """
    cfg = PolicyLossConfig.resolve(config, settings)
    terms = policy_loss_terms_ref(
        logp, old_logp, advantages, mask, ref_logp=ref_logp, rollout_logp=rollout_logp,
        rollout_is_weights=rollout_is_weights, config=cfg, cov_keys=cov_keys,
    )  # fmt: skip
    counts = dict(num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    loss = aggregate_ref(terms.loss, terms.kept, cfg.agg, **counts)  # rejected: not counted

    dtype = logp.dtype
    valid = mask != 0  # the non-finite inputs are counted over every valid token
    kept = terms.kept  # the metrics over the tokens rollout rejection keeps
    n = kept.sum().to(dtype)
    n1 = n.clamp(min=1)
    zero = logp.new_zeros((), dtype=dtype)
    ratio = terms.ratio[kept]  # [N_kept]
    adv = advantages[:, None].expand_as(logp) if advantages.dim() == 1 else advantages
    weights = rollout_is_weights
    weights = weights if weights is None or weights.dim() == 2 else weights[:, None]
    weights = None if weights is None else weights.expand_as(logp)
    read = [logp, old_logp, adv, rollout_logp, weights, ref_logp if cfg.uses_ref else None]
    nonfinite = sum((~torch.isfinite(t[valid])).sum() for t in read if t is not None)
    return PolicyLossOutput(
        loss=loss,
        clip_frac_low=(terms.clip_low & kept).sum().to(dtype) / n1,
        clip_frac_high=(terms.clip_high & kept).sum().to(dtype) / n1,
        dual_clip_frac=(terms.dual_clip & kept).sum().to(dtype) / n1,
        kl=terms.kl[kept].sum() / n1,
        ratio_mean=ratio.sum() / n1,
        ratio_min=ratio.min() if ratio.numel() else zero,
        ratio_max=ratio.max() if ratio.numel() else zero,
        num_tokens=n,
        num_nonfinite=nonfinite.to(dtype),
    )
