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

AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KLS = ("k1", "k2", "k3")
RATIO_LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class PolicyLossConfig:
    """Hyper-parameters of ``policy_loss``, ``fused_linear_policy_loss`` and their modules.

    Defaults are the PAPO paper's recipe: clip 0.2 / 0.28, no KL, token-mean aggregation.
    docs/design.md ("The policy loss") gives the formulas.
    """

    eps_low: float = 0.2  # clip at 1 - eps_low for A < 0; in [0, 1)
    eps_high: float = 0.28  # clip at 1 + eps_high for A > 0; >= 0
    dual_clip: float | None = None  # c > 1 bounds the loss of A < 0 tokens at -c*A; None: off
    beta: float = 0.0  # weight of the KL term; 0 skips it (ref_logp is not read)
    kl: str = "k3"  # KL estimator: k1 | k2 | k3
    ratio_level: str = "token"  # token | sequence (GSPO)
    agg: str = "token-mean"  # aggregation, see AGGS
    # Rollout correction: each token's loss is weighted by min(exp(old_logp - rollout_logp),
    # is_cap) when the sampler's log-probs are given; None leaves the weight untruncated.
    is_cap: float | None = 2.0

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "kl": KLS,
        "ratio_level": RATIO_LEVELS,
        "agg": AGGS,
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
        _number("eps_low", self.eps_low, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
        _number("eps_high", self.eps_high, lambda v: v >= 0.0, ">= 0")
        _number("beta", self.beta, lambda v: v >= 0.0, ">= 0")
        if self.dual_clip is not None:
            _number("dual_clip", self.dual_clip, lambda v: v > 1.0, "None or > 1")
        if self.is_cap is not None:
            _number("is_cap", self.is_cap, lambda v: v > 0.0, "None or > 0")

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
