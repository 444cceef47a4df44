"""The loss settings come from one place: PolicyLossConfig, taken whole (config=) or by field
(keywords), by the functional ops and their modules alike."""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch
from helpers import F64_ATOL, assert_close

from papo_fast import PAPOLoss, PolicyLossModule, policy_loss
from papo_fast.kernels.fused_linear_policy_loss import fused_linear_policy_loss
from papo_fast.kernels.loss_config import PolicyLossConfig

SETTINGS = [f.name for f in dataclasses.fields(PolicyLossConfig)]
ENTRIES = {
    "policy_loss": policy_loss,
    "fused_linear_policy_loss": fused_linear_policy_loss,
    "PolicyLossModule": PolicyLossModule.__init__,
    "PAPOLoss": PAPOLoss.__init__,
}


@pytest.mark.parametrize("name", list(ENTRIES))
def test_no_signature_restates_a_setting(name):
    # A keyword list copied into four signatures drifts: each takes config= and **settings.
    params = inspect.signature(ENTRIES[name]).parameters
    assert sorted(set(params) & set(SETTINGS)) == []
    assert "config" in params
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _batch():
    g = torch.Generator().manual_seed(0)
    logp = -3 * torch.rand(3, 7, generator=g, dtype=torch.float64)
    old = logp + 0.3 * torch.randn(3, 7, generator=g, dtype=torch.float64)
    adv = 2 * torch.randn(3, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 7, generator=g) > 0.2
    return logp, old, adv, mask


def test_config_and_keywords_give_the_same_loss():
    logp, old, adv, mask = _batch()
    cfg = PolicyLossConfig(eps_low=0.1, eps_high=0.15, dual_clip=1.5, agg="seq-mean-token-sum")
    by_config = policy_loss(logp, old, adv, mask=mask, config=cfg)
    by_keywords = policy_loss(
        logp, old, adv, mask=mask, eps_low=0.1, eps_high=0.15, dual_clip=1.5,
        agg="seq-mean-token-sum",
    )  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(by_config, by_keywords, strict=True))
    # a keyword overrides the config's field: back to the default eps_low
    default_low = policy_loss(logp, old, adv, mask=mask, config=cfg, eps_low=0.2)
    expected = policy_loss(logp, old, adv, mask=mask, config=dataclasses.replace(cfg, eps_low=0.2))
    assert all(torch.equal(a, b) for a, b in zip(default_low, expected, strict=True))
    assert default_low.loss.item() != by_config.loss.item()


@pytest.mark.parametrize("name", list(ENTRIES))
def test_an_unknown_setting_is_a_type_error_listing_the_settings(name):
    logp, old, adv, mask = _batch()
    calls = {
        "policy_loss": lambda: policy_loss(logp, old, adv, mask=mask, eps=0.1),
        "fused_linear_policy_loss": lambda: fused_linear_policy_loss(
            torch.randn(3, 7, 4),
            torch.randn(5, 4),
            torch.zeros(3, 7, dtype=torch.long),
            None,
            adv.float(),
            mask=mask,
            eps=0.1,
        ),  # fmt: skip
        "PolicyLossModule": lambda: PolicyLossModule(eps=0.1),
        "PAPOLoss": lambda: PAPOLoss(eps=0.1),
    }
    with pytest.raises(TypeError, match=r"unknown loss setting.*'eps'.*eps_low.*is_cap"):
        calls[name]()


def test_config_must_be_a_policy_loss_config():
    logp, old, adv, mask = _batch()
    with pytest.raises(TypeError, match="config must be a PolicyLossConfig, got dict"):
        policy_loss(logp, old, adv, mask=mask, config={"eps_low": 0.1})


def test_the_default_is_cap_truncates_the_rollout_weight():
    # logp = old = 0 (ratio 1), rollout = -ln 3: w = exp(old - rollout) = 3, truncated at the
    # default is_cap 2.0. A = 1: loss = -min(3, 2) = -2 on the one token, gradient -2.
    one = lambda v: torch.full((1, 1), v, dtype=torch.float64)  # noqa: E731
    logp = one(0.0).requires_grad_()
    args = (logp, one(0.0), torch.ones(1, dtype=torch.float64))
    kw = dict(mask=one(1.0) > 0, rollout_logp=one(-math.log(3.0)))
    res = policy_loss(*args, **kw)
    (grad,) = torch.autograd.grad(res.loss, logp)
    assert PolicyLossConfig().is_cap == 2.0
    assert_close(res.loss, torch.tensor(-2.0, dtype=torch.float64), atol=F64_ATOL)
    assert_close(grad, one(-2.0), atol=F64_ATOL)
    untruncated = policy_loss(*args, **kw, is_cap=None)  # -3: the weight as it is
    assert_close(untruncated.loss, torch.tensor(-3.0, dtype=torch.float64), atol=F64_ATOL)


def test_modules_hold_the_resolved_config():
    cfg = PolicyLossConfig(eps_high=0.3, agg="seq-mean-token-mean", beta=0.01)
    assert PolicyLossModule(cfg).config is cfg
    assert PolicyLossModule(eps_high=0.3).config == PolicyLossConfig(eps_high=0.3)
    assert PolicyLossModule(cfg, beta=0.0).config == dataclasses.replace(cfg, beta=0.0)
    # the trainer's two ways: the section itself, or its fields spread as keywords
    assert PAPOLoss(cfg, temperature=0.7, return_entropy=True).config is cfg
    spread = PAPOLoss(**dataclasses.asdict(cfg), temperature=0.7, return_entropy=True)
    assert spread.config == cfg
    assert "seq-mean-token-mean" in repr(spread) and "temperature=0.7" in repr(spread)
    with pytest.raises(ValueError, match="eps_low"):
        PolicyLossModule(eps_low=1.0)  # checked when the module is built, not at the first call


def test_modules_pass_their_config_to_the_ops():
    logp, old, adv, mask = _batch()
    cfg = PolicyLossConfig(eps_low=0.1, dual_clip=1.5, agg="seq-mean-token-sum")
    res = PolicyLossModule(cfg)(logp, old, adv, mask=mask, num_seqs=5)
    ref = policy_loss(logp, old, adv, mask=mask, config=cfg, num_seqs=5)
    assert all(torch.equal(a, b) for a, b in zip(res, ref, strict=True))
    hidden, weight = torch.randn(3, 7, 4), torch.randn(5, 4)
    targets = torch.randint(0, 5, (3, 7))
    args = (hidden, weight, targets, old.float(), adv.float())
    module = PAPOLoss(cfg, temperature=0.9)(*args, mask=mask)
    function = fused_linear_policy_loss(*args, mask=mask, config=cfg, temperature=0.9)
    assert all(
        (a is None and b is None) or torch.equal(a, b)
        for a, b in zip(module, function, strict=True)
    )
