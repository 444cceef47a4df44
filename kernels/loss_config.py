"""The settings of the GRPO-family policy loss, written once.

    cfg = PolicyLossConfig(eps_high=0.28, agg="seq-mean-token-sum-norm")
    policy_loss(logp, old_logp, advantages, mask=mask, config=cfg)
    PAPOLoss(cfg)                     # the module holds the same object
    loss: {eps_high: 0.28, ...}       # the trainer's YAML section is this dataclass

Every default lives in this dataclass and nowhere else: the functional ops, the modules and the
trainer's ``loss:`` section all take a ``PolicyLossConfig`` (the functional ops also accept its
fields as keywords, which override the config's). The allowed values of the string settings are
the tuples below, also used by the trainer's config checks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

AGGS = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "token-sum",
)
# k3+ is k3's value with k2's gradient (a straight-through estimator)
KLS = ("k1", "k2", "k3", "abs", "k3+")
RATIO_LEVELS = ("token", "sequence")
# ppo: the clipped ratio; cispo: the clipped ratio, detached, times logp; sapo: a sigmoid gate of
# the ratio; gpg: A times logp, no ratio; clip_cov: ppo with the loss of a random few tokens of
# high covariance of (A, logp) set to 0; kl_cov: the unclipped ratio, plus kl_cov_coef·|logp -
# old_logp| on the tokens of the highest covariance. docs/design.md ("The policy loss") has the
# formulas.
LOSS_TYPES = ("ppo", "cispo", "sapo", "gpg", "clip_cov", "kl_cov")
COV_TYPES = ("clip_cov", "kl_cov")  # the types that select tokens by covariance first
# The rollout weight per token, or one per sequence: exp of the SUM of its tokens' log-ratios
# old_logp - rollout_logp (verl's rollout_is="sequence", the product of the token weights).
IS_LEVELS = ("token", "sequence")
# Rollout rejection: the statistic held to [rs_low, rs_high], on log-ratios old_logp - rollout_logp
# each clamped to [-20, 20]: the token's own (verl's token_k1), the sum over the sequence
# (seq_sum_k1), or its mean, the geometric mean of the token weights (seq_mean_k1).
ROLLOUT_RS = (None, "token", "sequence", "geometric")


@dataclass(frozen=True)
class PolicyLossConfig:
    """Hyper-parameters of ``policy_loss``, ``fused_linear_policy_loss`` and their modules.

    Defaults are the PAPO paper's recipe: clip 0.2 / 0.28, no KL, token-mean aggregation.
    docs/design.md ("The policy loss") gives the formulas.
    """

    # ppo: clip at 1 - eps_low for A < 0, in [0, 1). cispo: the weight's lower bound, any A, in
    # [0, 1] (1: no lower bound). sapo, gpg: unused.
    eps_low: float = 0.2
    eps_high: float = 0.28  # ppo: clip at 1 + eps_high for A > 0; cispo: for any A; >= 0
    dual_clip: float | None = None  # c > 1 bounds the loss of A < 0 tokens at -c*A; None: off
    beta: float = 0.0  # weight of the KL term; 0 skips it (ref_logp is not read)
    kl: str = "k3"  # KL estimator, see KLS
    ratio_level: str = "token"  # token | sequence (GSPO)
    agg: str = "token-mean"  # aggregation, see AGGS
    # Rollout correction: each token's loss is weighted by min(exp(old_logp - rollout_logp),
    # is_cap) when the sampler's log-probs are given; None leaves the weight untruncated.
    is_cap: float | None = 2.0
    is_level: str = "token"  # the rollout weight per token or per sequence, see IS_LEVELS
    # Rollout rejection (needs rollout_logp): tokens or whole sequences whose ratio
    # pi_old / pi_rollout (see ROLLOUT_RS) leaves [rs_low, rs_high] leave the mask: no loss, no
    # gradient, not counted in this call's own N_tokens / N_seqs / L_max. None: off.
    rollout_rs: str | None = None
    rs_low: float = 0.5  # > 0
    rs_high: float = 2.0  # >= rs_low
    loss_type: str = "ppo"  # the policy-gradient term, see LOSS_TYPES
    sapo_tau_pos: float = 1.0  # sapo: the gate's temperature for A > 0; > 0
    sapo_tau_neg: float = 1.05  # sapo: the gate's temperature for A <= 0; > 0
    # The KL term times the (not detached) token ratio exp(logp - old_logp): an estimate of the KL
    # under the current policy from tokens sampled by the old one. Token ratio level only.
    kl_ratio_correction: bool = False
    # clip_cov: the share of the valid tokens (at least 1) whose loss is set to 0, drawn at random
    # among the unclipped ones with clip_cov_lb < cov < clip_cov_ub; in (0, 1]
    clip_cov_ratio: float = 0.0002
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    # kl_cov: the share of the valid tokens (at least 1), of the highest covariance, that get the
    # penalty kl_cov_coef·|logp - old_logp|; in (0, 1]
    kl_cov_ratio: float = 0.0002
    kl_cov_coef: float = 0.1  # >= 0; verl's ppo_kl_coef (its config's default)

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "loss_type": LOSS_TYPES,
        "kl": KLS,
        "ratio_level": RATIO_LEVELS,
        "agg": AGGS,
        "is_level": IS_LEVELS,
        "rollout_rs": ROLLOUT_RS,
    }

    def __post_init__(self) -> None:
        self.validate()

    @property
    def uses_ref(self) -> bool:
        return self.beta != 0.0

    def validate(self) -> None:
        """Raise a ValueError naming the first setting out of range."""
        for name, allowed in self.CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.loss_type == "cispo":
            _number("eps_low", self.eps_low, lambda v: 0.0 <= v <= 1.0, "in [0, 1] for cispo")
        else:
            _number("eps_low", self.eps_low, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
        _number("eps_high", self.eps_high, lambda v: v >= 0.0, ">= 0")
        _number("sapo_tau_pos", self.sapo_tau_pos, lambda v: v > 0.0, "> 0")
        _number("sapo_tau_neg", self.sapo_tau_neg, lambda v: v > 0.0, "> 0")
        _number("beta", self.beta, lambda v: v >= 0.0, ">= 0")
        _number("clip_cov_ratio", self.clip_cov_ratio, lambda v: 0.0 < v <= 1.0, "in (0, 1]")
        _number("kl_cov_ratio", self.kl_cov_ratio, lambda v: 0.0 < v <= 1.0, "in (0, 1]")
        _number("clip_cov_lb", self.clip_cov_lb, lambda v: True, "(any finite value)")
        _number("clip_cov_ub", self.clip_cov_ub, lambda v: True, "(any finite value)")
        if not self.clip_cov_lb < self.clip_cov_ub:  # named by the bound moved from its default
            ub_default = self.__dataclass_fields__["clip_cov_ub"].default
            name = "clip_cov_ub" if self.clip_cov_ub != ub_default else "clip_cov_lb"
            raise ValueError(
                f"{name} leaves clip_cov's band empty: clip_cov_lb < clip_cov_ub is needed, got "
                f"clip_cov_lb = {self.clip_cov_lb!r}, clip_cov_ub = {self.clip_cov_ub!r}"
            )
        _number("kl_cov_coef", self.kl_cov_coef, lambda v: v >= 0.0, ">= 0")
        if self.dual_clip is not None:
            _number("dual_clip", self.dual_clip, lambda v: v > 1.0, "None or > 1")
        if self.is_cap is not None:
            _number("is_cap", self.is_cap, lambda v: v > 0.0, "None or > 0")
        _number("rs_low", self.rs_low, lambda v: v > 0.0, "> 0")
        _number("rs_high", self.rs_high, lambda v: v >= self.rs_low, f">= rs_low = {self.rs_low}")
        if self.loss_type in COV_TYPES and self.rollout_rs is not None:
            raise ValueError(
                f"loss_type={self.loss_type!r} selects its tokens over the caller's mask, and "
                f"rollout_rs={self.rollout_rs!r} would then change that mask: not combined "
                "(reject the sequences before the call, or use another loss type)"
            )
        if not isinstance(self.kl_ratio_correction, bool):
            raise ValueError(
                f"kl_ratio_correction must be True or False, got {self.kl_ratio_correction!r}"
            )
        # The clipped ratio's companions are PPO's: the other terms have no ratio to bound
        # (gpg), or bound it their own way (cispo's weight, sapo's gate), per token.
        if self.loss_type != "ppo":
            if self.ratio_level == "sequence":
                raise ValueError(
                    f"loss_type={self.loss_type!r} takes the token ratio only: "
                    "ratio_level='sequence' (GSPO) goes with loss_type='ppo'"
                )
            if self.dual_clip is not None:
                raise ValueError(
                    f"dual_clip bounds PPO's clipped loss: set it to None with "
                    f"loss_type={self.loss_type!r}, got {self.dual_clip!r}"
                )
        if self.kl_ratio_correction and self.ratio_level == "sequence":
            raise ValueError(
                "kl_ratio_correction weights each token's KL by its token ratio: it goes with "
                "ratio_level='token', not 'sequence'"
            )

    @classmethod
    def resolve(cls, config: PolicyLossConfig | None, settings: dict[str, Any]) -> PolicyLossConfig:
        """``config`` (default: the defaults) with ``settings`` (field name -> value) replaced;
        a TypeError for a name that is no setting."""
        if config is not None and not isinstance(config, cls):
            raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise TypeError(f"unknown loss setting(s) {unknown}; the settings are {names}")
        base = config if config is not None else cls()
        return dataclasses.replace(base, **settings) if settings else base


def _number(name: str, value: Any, ok, rule: str) -> None:
    """A finite int or float for which ``ok`` holds; else a ValueError stating ``rule``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number {rule}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not ok(float(value)):
        raise ValueError(f"{name} must be {rule}, got {value!r}")
