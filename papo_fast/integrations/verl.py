"""PAPO inside verl (0.9.1): the ``papo`` advantage estimator and the ``papo_fast`` policy loss,
registered in verl's own registries when verl loads its plugins (entry point group
``verl.plugins``; or ``VERL_USE_EXTERNAL_MODULES=papo_fast.integrations.verl``).

    algorithm.adv_estimator=papo  +algorithm.papo.mode=papo  +algorithm.papo.lam=1.0
    actor_rollout_ref.actor.policy_loss.loss_mode=papo_fast
    trainer.v1.trainer_mode=papo_sync      # hands the process score to the estimator
    # the legacy trainer (trainer.use_v1=False) instead of papo_sync:
    #   VERL_USE_EXTERNAL_MODULES=papo_fast.integrations.verl_legacy

Importing this module also registers the v1 trainer mode ``papo_sync`` (verl_trainer.py) when
verl's v1 trainer can be imported. The reward side is verl_reward.py.

Choices (how verl's semantics are matched; the README lists them):
1. **Estimator.** ``papo_advantages`` on the summed token rewards (verl puts each response's
   reward on its last valid token; verl's ``grpo`` sums them too), one group per uid string, the
   process score and correctness from the fields the trainer hands over (verl_fields.py); the
   advantage is broadcast over the response mask. A group of one response gets 0 (verl's
   ``grpo`` gives it r / (1 + eps)). ``scale_by_std`` unset follows verl's
   ``algorithm.norm_adv_by_std_in_grpo``.
2. **Policy loss.** ``policy_loss`` with verl's settings: clip_ratio_low / clip_ratio_high
   (clip_ratio where unset) as eps_low / eps_high, clip_ratio_c as the dual clip (verl applies
   it always). No KL term inside: verl adds its KL loss itself. verl clamps the log-ratio to
   [-20, 20] before exp; papo_fast does not (the two differ only past a ratio of e^20).
3. **Global counts.** verl's ``global_batch_info`` (dp_size, batch_num_tokens,
   global_batch_size, loss_scale_factor) become policy_loss's num_tokens / num_seqs / max_len,
   and the loss is multiplied by dp_size, as verl's ``agg_loss`` does (its data-parallel
   gradient is an average over ranks). ``token-sum`` is seq-mean-token-sum with N_seqs = 1; the
   L_max of ``seq-mean-token-sum-norm`` is loss_scale_factor, else the padded length, as verl's.
4. **Rollout correction.** verl's ``rollout_is_weights`` (w >= 0) multiply the advantages token
   by token: the clipped loss is positively homogeneous in A, so w * loss(A) = loss(w * A).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from verl.trainer.ppo.core_algos import register_adv_est, register_policy_loss

from papo_fast.integrations.verl_fields import current_fields
from papo_fast.kernels.advantages import MODES, papo_advantages
from papo_fast.kernels.loss_config import PolicyLossConfig
from papo_fast.kernels.policy_loss import policy_loss

logger = logging.getLogger(__name__)

ESTIMATOR = "papo"  # algorithm.adv_estimator
LOSS_MODE = "papo_fast"  # actor_rollout_ref.actor.policy_loss.loss_mode
VERL_AGGS = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
             "seq-mean-token-sum-norm")  # fmt: skip


@dataclass(frozen=True)
class PAPOSettings:
    """``algorithm.papo``: the estimator's settings (papo_advantages' arguments)."""

    mode: str = "papo"  # papo | orm | prm | mult | fullnorm
    lam: float = 1.0  # weight of the process part (papo, fullnorm)
    eps: float = 1e-6  # std threshold and denominator epsilon (verl's grpo uses 1e-6 too)
    scale_by_std: bool | None = None  # None: algorithm.norm_adv_by_std_in_grpo

    @classmethod
    def from_algorithm(cls, algorithm: Any) -> tuple[PAPOSettings, bool]:
        """(settings, scale_by_std) from verl's ``algorithm`` config (DictConfig, AlgoConfig or
        None); a ValueError naming ``algorithm.papo.<key>`` for an unknown key or a bad value."""
        section = _get(algorithm, "papo", None) or {}
        given = dict(section.items()) if hasattr(section, "items") else None
        if given is None:
            raise ValueError(f"algorithm.papo must be a mapping, got {section!r}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ValueError(f"unknown key(s) algorithm.papo.{unknown[0]}: the keys are {names}")
        settings = cls(**given)
        if settings.mode not in MODES:
            raise ValueError(f"algorithm.papo.mode must be one of {sorted(MODES)}, "
                             f"got {settings.mode!r}")  # fmt: skip
        for name in ("lam", "eps"):
            value = getattr(settings, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"algorithm.papo.{name} must be a number, got {value!r}")
        scale = settings.scale_by_std
        if scale is None:
            scale = bool(_get(algorithm, "norm_adv_by_std_in_grpo", True))
        elif not isinstance(scale, bool):
            raise ValueError(f"algorithm.papo.scale_by_std must be true or false, got {scale!r}")
        return settings, scale


def _get(config: Any, key: str, default: Any) -> Any:
    """``config[key]`` for a DictConfig, a verl dataclass config or a dict; default if absent."""
    if config is None:
        return default
    if hasattr(config, "get"):
        return config.get(key, default)
    return getattr(config, key, default)


def group_ids(index: Any, n: int) -> torch.Tensor:
    """[N] int64 group ids from verl's uids (strings, any order)."""
    if index is None:
        raise ValueError("the papo estimator needs the batch's uids (non_tensor_batch['uid'])")
    uids = np.asarray(index, dtype=object)
    if uids.shape != (n,):
        raise ValueError(f"uid index has shape {uids.shape}, expected ({n},) like the rewards")
    _, inverse = np.unique(uids.astype(str), return_inverse=True)
    return torch.from_numpy(inverse.astype(np.int64).reshape(n))


@register_adv_est(ESTIMATOR)
def compute_papo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray | None = None,
    config: Any = None,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's advantage-estimator interface around ``papo_advantages``.

    Args:
        token_level_rewards: [B, L] rewards (verl: the score on the last valid token).
        response_mask: [B, L] 1 on response tokens.
        index: [B] uid of each response's prompt (strings).
        config: verl's ``algorithm`` config; its ``papo`` section is PAPOSettings.

    Returns:
        (advantages, returns): both [B, L] in the rewards' dtype, 0 outside the mask.
    """
    settings, scale_by_std = PAPOSettings.from_algorithm(config)
    if token_level_rewards.dim() != 2 or response_mask.shape != token_level_rewards.shape:
        raise ValueError(
            f"token_level_rewards {tuple(token_level_rewards.shape)} and response_mask "
            f"{tuple(response_mask.shape)} must both be [B, L]"
        )
    n = token_level_rewards.shape[0]
    outcome = token_level_rewards.sum(dim=-1)  # [B]
    handed = current_fields(index)
    process = correct = None
    if handed is not None:
        device = outcome.device
        if handed.process is not None:
            process = torch.as_tensor(handed.process, device=device)
        if handed.correct is not None:
            correct = torch.as_tensor(handed.correct, device=device)
    if process is None and settings.mode != "orm":
        raise ValueError(
            f"algorithm.papo.mode={settings.mode!r} needs the process score of each response: "
            f"return it from compute_score as {'papo_process'!r} and run "
            "trainer.v1.trainer_mode=papo_sync (legacy trainer: "
            "VERL_USE_EXTERNAL_MODULES=papo_fast.integrations.verl_legacy)"
        )
    with torch.no_grad():
        out = papo_advantages(
            outcome, process, group_ids=group_ids(index, n).to(outcome.device), correct=correct,
            mode=settings.mode, lam=settings.lam, eps=settings.eps, scale_by_std=scale_by_std,
        )  # fmt: skip
        adv = out.advantages.to(token_level_rewards.dtype)[:, None] * response_mask  # [B, L]
    if handed is not None:
        handed.stats.update({k: float(v) for k, v in out.stats.items()})
    return adv, adv


# -------------------------------------------------------------------------------------------------
# Policy loss
# -------------------------------------------------------------------------------------------------


def loss_settings(config: Any, loss_agg_mode: str) -> PolicyLossConfig:
    """verl's actor settings as a PolicyLossConfig (module docstring, choice 2)."""
    if loss_agg_mode not in VERL_AGGS:
        raise ValueError(f"loss_agg_mode must be one of {VERL_AGGS}, got {loss_agg_mode!r}")
    clip = _get(config, "clip_ratio", 0.2)
    low, high = _get(config, "clip_ratio_low", None), _get(config, "clip_ratio_high", None)
    agg = "seq-mean-token-sum" if loss_agg_mode == "token-sum" else loss_agg_mode
    return PolicyLossConfig(
        eps_low=clip if low is None else low,
        eps_high=clip if high is None else high,
        dual_clip=_get(config, "clip_ratio_c", 3.0),
        beta=0.0,
        agg=agg,
        is_cap=None,
    )


def global_counts(info: dict, loss_agg_mode: str, response_mask: torch.Tensor) -> tuple[dict, int]:
    """(policy_loss's num_tokens / num_seqs / max_len, dp_size) from verl's global_batch_info,
    with verl's rule that more than one rank needs the global counts."""
    dp = int(info.get("dp_size", 1) or 1)
    tokens, seqs = info.get("batch_num_tokens"), info.get("global_batch_size")
    if loss_agg_mode == "token-mean":
        if tokens is None and dp > 1:
            raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
        return {"num_tokens": tokens}, dp
    if loss_agg_mode == "token-sum":
        return {"num_seqs": 1}, dp
    if seqs is None and dp > 1:
        raise ValueError("global_batch_size is required when dp_size > 1")
    counts = {"num_seqs": seqs}
    if loss_agg_mode == "seq-mean-token-sum-norm":
        factor = info.get("loss_scale_factor")
        counts["max_len"] = response_mask.shape[-1] if factor is None else factor
    return counts, dp


@register_policy_loss(LOSS_MODE)
def compute_policy_loss_papo_fast(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's policy-loss interface around papo_fast's fused ``policy_loss``.

    Args:
        old_log_prob, log_prob, advantages, response_mask: [B, L] (verl's padded layout).
        loss_agg_mode: verl's aggregation name (VERL_AGGS).
        config: verl's actor config (clip ratios, clip_ratio_c, global_batch_info).
        rollout_is_weights: [B, L] verl's rollout-correction weights, or None.

    Returns:
        (loss, metrics): the scalar loss scaled as verl's agg_loss scales it, and verl's metric
        names (actor/pg_clipfrac, actor/ppo_kl, actor/pg_clipfrac_lower).
    """
    if config is None:
        raise ValueError("the papo_fast policy loss needs verl's actor config (config=None given)")
    cfg = loss_settings(config, loss_agg_mode)
    counts, dp = global_counts(dict(_get(config, "global_batch_info", None) or {}),
                               loss_agg_mode, response_mask)  # fmt: skip
    if rollout_is_weights is not None:
        w = rollout_is_weights.detach()
        if bool((w[response_mask.bool()] < 0).any()):
            raise ValueError("rollout_is_weights must be >= 0 at the response tokens")
        advantages = advantages * w  # choice 4
    out = policy_loss(log_prob, old_log_prob, advantages, mask=response_mask, config=cfg, **counts)
    mask = response_mask.bool()
    with torch.no_grad():  # verl's metrics are Python numbers: one read from the device for all
        n = mask.sum()
        kl = torch.where(mask, old_log_prob - log_prob, 0.0).float().sum() / n.clamp(min=1)
        values = (out.clip_frac_low + out.clip_frac_high, torch.where(n > 0, kl, out.kl),
                  out.dual_clip_frac)  # fmt: skip
        clip, ppo_kl, lower = torch.stack([v.float() for v in values]).tolist()
    metrics = {"actor/pg_clipfrac": clip, "actor/ppo_kl": ppo_kl, "actor/pg_clipfrac_lower": lower}
    return out.loss * dp, metrics


def _register_trainer() -> None:
    """The v1 trainer mode ``papo_sync``, where verl's v1 trainer imports (it needs
    TransferQueue); said in the log otherwise, since verl hides a plugin's import errors."""
    try:
        from papo_fast.integrations import verl_trainer  # noqa: F401
    except ImportError as err:
        logger.warning("papo_fast: trainer mode papo_sync not registered: %s", err)


_register_trainer()
