"""Rollout correction against verl 0.9.1's own functions (verl/trainer/ppo/rollout_corr_helper.py).

Runs in its own virtual environment (.ci/run's verl group); elsewhere the module is skipped.
Our settings in verl's terms (log_ratio = old_logp - rollout_logp in both):
- is_level="sequence", is_cap=C  <->  compute_rollout_correction_weights(rollout_is="sequence",
  rollout_is_threshold=C): exp of the SUM of the token log-ratios (clamped to +-20), truncated;
- rollout_rs="token" / "sequence" / "geometric", [rs_low, rs_high]  <->
  compute_rollout_rejection_mask(rollout_rs="token_k1" / "seq_sum_k1" / "seq_mean_k1",
  rollout_rs_threshold="lo_hi") with lo = 1 / rs_high and hi = 1 / rs_low: verl's k1 statistic is
  -log_ratio, a bound on pi_rollout / pi_old, ours on pi_old / pi_rollout;
- verl's policy loss multiplies pg by rollout_is_weights and aggregates over the modified
  response_mask: our loss with rollout_logp and the rejection settings.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("verl")

from helpers import F64_ATOL, assert_close, make_batch, ours  # noqa: E402
from verl.trainer.ppo.rollout_corr_helper import (  # noqa: E402
    compute_rollout_correction_weights,
    compute_rollout_rejection_mask,
)

from papo_fast.kernels.loss_config import PolicyLossConfig  # noqa: E402
from papo_fast.kernels.policy_loss_ref import rollout_kept_ref  # noqa: E402

pytestmark = pytest.mark.verl

RS = {"token": "token_k1", "sequence": "seq_sum_k1", "geometric": "seq_mean_k1"}
BANDS = {"token": (0.8, 1.25), "sequence": (0.7, 1.4), "geometric": (0.97, 1.05)}


@pytest.mark.parametrize("rs", list(RS))
def test_rejection_matches_verl_mask(rs):
    d = make_batch(b=9, length=47, seed=31)
    lo, hi = BANDS[rs]
    cfg = PolicyLossConfig(rollout_rs=rs, rs_low=lo, rs_high=hi)
    theirs, _ = compute_rollout_rejection_mask(
        d["old"] - d["rollout"], d["mask"].double(), rollout_rs=RS[rs],
        rollout_rs_threshold=f"{1 / hi!r}_{1 / lo!r}",
    )  # fmt: skip
    kept = rollout_kept_ref(d["old"], d["rollout"], d["mask"], cfg)
    assert 0 < kept.sum() < d["mask"].sum()  # the band bites
    assert torch.equal(kept, theirs.bool())


@pytest.mark.parametrize("cap", [1.5, 1e6])
def test_sequence_weight_matches_verl(cap):
    d = make_batch(b=6, length=31, seed=32)
    w, _ = compute_rollout_correction_weights(
        d["old"] - d["rollout"], d["mask"].double(), rollout_is="sequence", rollout_is_threshold=cap
    )
    log_w = ((d["old"] - d["rollout"]) * d["mask"]).sum(-1).clamp(-20, 20)
    ours_w = torch.exp(log_w).clamp(max=cap)[:, None].expand_as(w) * d["mask"]
    assert_close(ours_w, w, atol=F64_ATOL)
    assert not w.requires_grad


@pytest.mark.parametrize("backend", ["torch"])
@pytest.mark.parametrize("rs", list(RS))
def test_loss_matches_verl_pipeline(rs, backend):
    # verl's steps: weights from the ORIGINAL mask, rejection mask, then vanilla PPO's pg times
    # the weights, token-mean over the modified mask; ours: one call
    d = make_batch(b=9, length=47, seed=33)
    lo, hi = BANDS[rs]
    log_ratio, m = d["old"] - d["rollout"], d["mask"].double()
    w, _ = compute_rollout_correction_weights(log_ratio, m, rollout_is="sequence",
                                              rollout_is_threshold=2.0)  # fmt: skip
    kept, _ = compute_rollout_rejection_mask(
        log_ratio, m, rollout_rs=RS[rs], rollout_rs_threshold=f"{1 / hi!r}_{1 / lo!r}"
    )
    logp = d["logp"].clone().requires_grad_()
    ratio = torch.exp(logp - d["old"])
    adv = d["adv"][:, None]
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.28)) * w
    want = (pg * kept).sum() / kept.sum()
    (want_grad,) = torch.autograd.grad(want, logp)
    kw = dict(is_level="sequence", is_cap=2.0, rollout_rs=rs, rs_low=lo, rs_high=hi)
    res, grad = ours(d, backend=backend, **kw)
    assert_close(res.loss, want, atol=F64_ATOL)
    assert_close(grad, want_grad, atol=F64_ATOL)
