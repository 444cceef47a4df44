"""The token selection of the covariance losses (clip_cov, kl_cov): a pre-pass over the batch.

    cov_selection(logp, old_logp, advantages, mask, cu_seqlens, cfg, adv_per_token, generator)
        -> select, like logp, bool

Both losses (verl's ``compute_policy_loss_clip_cov`` / ``compute_policy_loss_kl_cov``, from
"The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models") rank the valid
tokens of the batch by the covariance of advantage and log-prob,

    cov_t = (A_t − mean A) · (logp_t − mean logp),   means over this call's valid tokens,

and treat a few tokens differently in the token pass (policy_loss_torch.py, policy_loss_triton.py):

- clip_cov: candidates are the valid tokens that PPO's clip leaves alone with
  clip_cov_lb < cov_t < clip_cov_ub; max(1, ⌊clip_cov_ratio · N⌋) of them (all when fewer),
  drawn uniformly at random, get loss 0 (and gradient 0).
- kl_cov: the max(1, ⌊kl_cov_ratio · N⌋) valid tokens of the largest cov_t get the penalty
  kl_cov_coef · |logp − old_logp| (N: valid tokens; none when N = 0).

In torch ops on logp's device, in float64 (so the selection does not depend on the inputs' dtype
beyond their values), with no host sync: the count k stays a device tensor, and the k first
tokens of an order are those whose rank (an argsort, its inverse scattered) is below k. The
random draw is one uniform float64 key per position of logp, ``torch.rand(logp.shape,
generator=generator)``: the candidates of the k smallest keys are chosen. The selection depends
on the batch of the call, as in verl: these losses are not micro-batch invariant.
"""

from __future__ import annotations

import torch

from .loss_config import COV_TYPES, PolicyLossConfig


def _first_k(keys: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The eligible positions of the k smallest keys (ties: the lower flat index first), k a 0-dim
    tensor; a bool tensor like keys."""
    flat = torch.where(eligible, keys, torch.inf).reshape(-1)
    order = torch.argsort(flat, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return eligible & (rank.view(keys.shape) < k)


def cov_selection(
    logp: torch.Tensor,  # [B, L] or [T]
    old_logp: torch.Tensor | None,  # like logp
    advantages: torch.Tensor,  # [B] or like logp
    mask: torch.Tensor | None,  # [B, L] (padded layout)
    cu_seqlens: torch.Tensor | None,  # [B + 1] (packed layout)
    cfg: PolicyLossConfig,
    adv_per_token: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor | None:
    """The tokens the covariance loss ``cfg.loss_type`` treats apart (module docstring), like logp,
    bool, False at masked positions; None for the other loss types. ``generator`` (on logp's
    device) makes clip_cov's draw reproducible; None: the device's default generator. Inputs are
    checked (check_inputs)."""
    if cfg.loss_type not in COV_TYPES:
        return None
    dev = logp.device
    lp = logp.detach().double()
    if cu_seqlens is None:
        valid = mask if mask.dtype == torch.bool else mask != 0  # [B, L]
        adv = advantages.detach().double()
        adv = adv if adv_per_token else adv[:, None].expand_as(lp)
    else:
        valid = torch.ones_like(lp, dtype=torch.bool)
        lens = cu_seqlens[1:] - cu_seqlens[:-1]
        adv = advantages.detach().double()
        adv = adv if adv_per_token else torch.repeat_interleave(adv, lens, output_size=lp.numel())
    n = valid.sum().double()
    mean = lambda x: torch.where(valid, x, 0.0).sum() / n.clamp(min=1)  # noqa: E731
    cov = (adv - mean(adv)) * (lp - mean(lp))
    if cfg.loss_type == "kl_cov":
        k = torch.where(n > 0, (cfg.kl_cov_ratio * n).floor().clamp(min=1), 0.0)
        return _first_k(-cov, valid, k)
    old = lp if old_logp is None else old_logp.detach().double()
    ratio = torch.exp(lp - old)
    clipped = ((ratio > 1 + cfg.eps_high) & (adv > 0)) | ((ratio < 1 - cfg.eps_low) & (adv < 0))
    band = valid & ~clipped & (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub)
    k = (cfg.clip_cov_ratio * n).floor().clamp(min=1)
    keys = torch.rand(lp.shape, generator=generator, dtype=torch.float64, device=dev)
    return _first_k(keys, band, k)
