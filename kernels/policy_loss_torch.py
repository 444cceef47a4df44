"""The clipped GRPO token loss in plain PyTorch: the CPU path of ``policy_loss`` and its spec.

It computes what the Triton kernels in policy_loss.py compute, with the same three outputs, so that
both backends share one autograd.Function and one finalization:

- ``grad``: d(Σ_t c_t·loss_t)/d logp_t per token, where c_t is the token's share before the global
  denominator (1 for a valid token, or 1/|y_i| under "seq-mean-token-mean"; 0 for a masked one);
- ``stats``: the sums the loss and its metrics are made of (slots below);
- ``seq_counts``: valid tokens per sequence, for the local N_seq and L_max.

Per token t of sequence i, with A the advantage (DESIGN §2):
  log-ratio  r_t = logp_t − old_t   (0 when old_logp is None)
  ratio      ρ_t = exp(r_t), or at sequence level (GSPO) s_i = exp(Σ_t m_t·r_t / |y_i|) for every
             t of i; d ρ_t / d logp_t = ρ_t both ways (verl's logp − sg(logp) + sg(mean) form)
  pg         −ρ·A, or −clip(ρ)·A with no gradient when clipped:
             high: ρ > 1 + eps_high and A > 0;  low: ρ < 1 − eps_low and A < 0
  dual clip  A < 0 and pg > −c·A → pg = −c·A, no gradient
  rollout    w_t = min(exp(old_t − rollout_t), is_cap), detached, multiplies pg (not the KL term)
  KL         δ = logp − ref: k1 δ (d 1), k2 δ²/2 (d δ), k3 e^−δ + δ − 1 (d 1 − e^−δ)
  loss_t     w_t·pg_t + beta·KL_t
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Slots of the stats vector (the Triton kernel writes one such row per program).
LOSS, COUNT, CLIP_LOW, CLIP_HIGH, DUAL_CLIP, KL_SUM, RATIO_SUM, RATIO_MIN, RATIO_MAX = range(9)
NONFINITE = 9  # slots 9..13 count non-finite values among valid tokens, in this order:
CHECKED = ("logp", "old_logp", "ref_logp", "advantages", "rollout_logp")
NUM_STATS = 16  # row width (padded to a power of two for the kernel's stores)

AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KLS = ("k1", "k2", "k3")
RATIO_LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class LossConfig:
    """The hyper-parameters of one call, validated by ``policy_loss``."""

    eps_low: float
    eps_high: float
    dual_clip: float | None
    beta: float
    kl: str
    ratio_level: str
    agg: str
    is_cap: float | None

    @property
    def uses_ref(self) -> bool:
        return self.beta != 0.0


def compute_dtype(logp: torch.Tensor) -> torch.dtype:
    """fp32 math for bf16/fp16/fp32 inputs; float64 stays float64 (gradcheck)."""
    return torch.float64 if logp.dtype == torch.float64 else torch.float32


def advantages_per_token(advantages: torch.Tensor, num_seqs: int) -> bool:
    """[B] is per sequence (also when a packed batch has T == B); anything else is per token."""
    return not (advantages.dim() == 1 and advantages.numel() == num_seqs)


def policy_loss_torch(
    logp: torch.Tensor,  # [B, L] or [T]
    old_logp: torch.Tensor | None,  # like logp
    advantages: torch.Tensor,  # [B] or like logp
    mask: torch.Tensor | None,  # [B, L] (padded layout)
    cu_seqlens: torch.Tensor | None,  # [B + 1] (packed layout)
    ref_logp: torch.Tensor | None,  # like logp
    rollout_logp: torch.Tensor | None,  # like logp
    cfg: LossConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad like logp in logp's dtype, stats [NUM_STATS], seq_counts [B]) of checked inputs."""
    cdt = compute_dtype(logp)
    dev = logp.device
    n = logp.numel()
    idx = torch.arange(n, device=dev)
    if cu_seqlens is None:
        b, length = logp.shape
        seq = idx // max(length, 1)  # [T]
        valid = mask.reshape(-1) != 0  # [T]
    else:
        b = cu_seqlens.numel() - 1
        seq = torch.searchsorted(cu_seqlens[1:].to(torch.int64).contiguous(), idx, right=True)
        valid = torch.ones(n, dtype=torch.bool, device=dev)

    def tokens(t: torch.Tensor) -> torch.Tensor:  # masked-out positions may hold anything
        return torch.where(valid, t.detach().reshape(-1).to(cdt), 0.0)

    lp = tokens(logp)
    old = lp if old_logp is None else tokens(old_logp)
    if advantages_per_token(advantages, b):
        adv = tokens(advantages)
    else:
        adv = torch.where(valid, advantages.detach().to(cdt)[seq], 0.0)
    vf = valid.to(cdt)
    seq_counts = torch.zeros(b, dtype=cdt, device=dev).index_add_(0, seq, vf)  # [B]

    log_ratio = lp - old
    if cfg.ratio_level == "sequence":
        seq_mean = torch.zeros(b, dtype=cdt, device=dev).index_add_(0, seq, log_ratio)
        log_ratio = (seq_mean / seq_counts.clamp(min=1))[seq]
    ratio = torch.exp(log_ratio)

    lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
    clip_high = (ratio > hi) & (adv > 0)
    clip_low = (ratio < lo) & (adv < 0)
    clipped = clip_high | clip_low
    pg = -adv * torch.where(clipped, ratio.clamp(lo, hi), ratio)
    dpg = torch.where(clipped, 0.0, -adv)  # d pg / d ratio
    c = math.inf if cfg.dual_clip is None else cfg.dual_clip
    bound = -c * adv
    dual = (adv < 0) & (pg > bound)
    pg = torch.where(dual, bound, pg)
    dloss = torch.where(dual, 0.0, dpg) * ratio
    if rollout_logp is not None:
        w = torch.exp(old - tokens(rollout_logp))
        if cfg.is_cap is not None:
            w = w.clamp(max=cfg.is_cap)
        pg, dloss = w * pg, w * dloss
    loss = pg
    kl = torch.zeros_like(lp)
    if cfg.uses_ref:
        delta = lp - tokens(ref_logp)
        if cfg.kl == "k1":
            kl, dkl = delta, torch.ones_like(delta)
        elif cfg.kl == "k2":
            kl, dkl = 0.5 * delta * delta, delta
        else:
            e = torch.exp(-delta)
            kl, dkl = e + delta - 1.0, 1.0 - e
        loss = loss + cfg.beta * kl
        dloss = dloss + cfg.beta * dkl

    coef = vf
    if cfg.agg == "seq-mean-token-mean":
        coef = vf / seq_counts.clamp(min=1)[seq]
    grad = torch.where(valid, coef * dloss, 0.0).to(logp.dtype).view_as(logp)

    def count(flags: torch.Tensor) -> torch.Tensor:
        return (valid & flags).sum().to(cdt)

    def nonfinite(t: torch.Tensor | None) -> torch.Tensor:  # t: a tokens() array, or None if unread
        return torch.zeros((), dtype=cdt, device=dev) if t is None else count(~torch.isfinite(t))

    inf = torch.tensor(math.inf, dtype=cdt, device=dev)
    stats = torch.stack(
        [
            torch.where(valid, coef * loss, 0.0).sum(),
            vf.sum(),
            count(clip_low),
            count(clip_high),
            count(dual),
            torch.where(valid, kl, 0.0).sum(),
            torch.where(valid, ratio, 0.0).sum(),
            torch.where(valid, ratio, inf).min() if n else inf,
            torch.where(valid, ratio, -inf).max() if n else -inf,
            nonfinite(lp),
            nonfinite(None if old_logp is None else old),
            nonfinite(tokens(ref_logp) if cfg.uses_ref else None),
            nonfinite(adv),
            nonfinite(None if rollout_logp is None else tokens(rollout_logp)),
        ]
    )
    stats = torch.cat([stats, stats.new_zeros(NUM_STATS - stats.numel())])
    return grad, stats, seq_counts
