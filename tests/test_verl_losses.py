"""policy_loss's loss types, KL estimators and token-sum against verl 0.9.1's own functions
(verl.trainer.ppo.core_algos, CPU): compute_policy_loss_cispo / _sapo / _gpg / _vanilla through
get_policy_loss_fn, kl_penalty, and agg_loss's "token-sum".

Runs in its own virtual environment (.ci/run's verl group); elsewhere the module is skipped.
Settings mapped: clip_ratio_low / _high -> eps_low / eps_high; tau_pos / tau_neg -> sapo_tau_pos /
sapo_tau_neg; clip_ratio_c -> dual_clip; rollout_is_weights w -> rollout_logp = old - log w with
is_cap=None; kl_penalty names: kl/k1, mse/k2, low_var_kl/k3, abs, k3+/low_var_kl+. verl clamps
the log-ratio to [-20, 20] and k3 to [-10, 10]; the data here stays inside both.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("verl")

from helpers import F64_ATOL, assert_close, assert_close_to_ref  # noqa: E402
from verl.trainer.ppo.core_algos import agg_loss, get_policy_loss_fn, kl_penalty  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

from papo_fast import policy_loss  # noqa: E402

pytestmark = pytest.mark.verl

B, L = 12, 13
ALONE = {"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None,
         "loss_scale_factor": None}  # fmt: skip


def batch(seed: int = 0, dtype=torch.float64) -> dict:
    """Ragged right-padded rows; per-token advantages broadcast from per-row values, as verl
    passes them; log-ratios across both clip edges; rollout weights in (0, 2)."""
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    mask = torch.arange(L)[None, :] < lengths[:, None]
    logp = -3 * torch.rand(B, L, **f64)
    old = logp + 0.4 * torch.randn(B, L, **f64)
    ref = logp + 0.3 * torch.randn(B, L, **f64)
    adv = torch.randn(B, 1, **f64) * mask
    weights = 0.05 + 1.9 * torch.rand(B, L, **f64)
    data = dict(logp=logp, old=old, ref=ref, adv=adv, weights=weights)
    return {k: v.to(dtype) for k, v in data.items()} | {"mask": mask}


def verl_loss(name: str, d: dict, agg: str, weighted: bool, **actor):
    cfg = ActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=2,
                      loss_agg_mode=agg, **actor)  # fmt: skip
    cfg.global_batch_info.update(ALONE)
    logp = d["logp"].clone().requires_grad_()
    loss, metrics = get_policy_loss_fn(name)(
        old_log_prob=d["old"], log_prob=logp, advantages=d["adv"], response_mask=d["mask"],
        loss_agg_mode=agg, config=cfg, rollout_is_weights=d["weights"] if weighted else None,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad, metrics


def our_loss(d: dict, backend: str, weighted: bool, **kw):
    logp = d["logp"].clone().requires_grad_()
    rollout = d["old"] - d["weights"].log() if weighted else None
    res = policy_loss(
        logp, d["old"], d["adv"], mask=d["mask"], ref_logp=d["ref"], rollout_logp=rollout,
        is_cap=None, backend=backend, **kw,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(res.loss, logp)
    return res, grad


# verl's loss name, its ActorConfig settings, its aggregation -> ours
TYPES = {
    "cispo": (dict(clip_ratio_low=0.2, clip_ratio_high=0.28), "token-mean",
              dict(loss_type="cispo", eps_low=0.2, eps_high=0.28)),
    "sapo": (dict(tau_pos=0.8, tau_neg=1.3), "seq-mean-token-mean",  # verl's sapo fixes it
             dict(loss_type="sapo", sapo_tau_pos=0.8, sapo_tau_neg=1.3)),
    "gpg": ({}, "seq-mean-token-sum", dict(loss_type="gpg")),
    "vanilla": (dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0), "token-sum",
                dict(eps_low=0.2, eps_high=0.28, dual_clip=3.0)),
}  # fmt: skip


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "rollout_is_weights"])
@pytest.mark.parametrize("name", list(TYPES))
def test_float64_matches_verl(name, weighted):
    actor, agg, ours_kw = TYPES[name]
    d = batch(seed=list(TYPES).index(name))
    want, want_grad, metrics = verl_loss(name, d, agg, weighted, **actor)
    res, grad = our_loss(d, "torch", weighted, agg=agg, **ours_kw)
    assert_close(res.loss, want, atol=F64_ATOL, msg=f"{name} loss")
    assert_close(grad, want_grad, atol=F64_ATOL, msg=f"{name} grad")
    if name == "cispo":  # verl counts ratio != clip(ratio): both of our fractions
        frac = (res.clip_frac_low + res.clip_frac_high).item()
        # verl's fraction is a float32 mean (its flags are cast with .float()): one float32
        # rounding of a number <= 1
        assert frac == pytest.approx(metrics["actor/pg_clipfrac"], abs=torch.finfo().eps)
        assert 0 < frac < 1
    if name == "sapo":  # no clip: verl reports 0 as well
        assert res.clip_frac_low.item() == res.clip_frac_high.item() == 0.0


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("name", list(TYPES))
def test_triton_float32_matches_verl(name, packed):
    # err(ours vs verl's float64) <= 2 * err(verl's float32 vs its float64) + 4 float32 ulps of
    # the result's scale: tests/helpers.py's derived rule
    actor, agg, ours_kw = TYPES[name]
    d64 = batch(seed=10 + list(TYPES).index(name))
    d32 = {k: v.float() if v.is_floating_point() else v for k, v in d64.items()}
    want, want_grad, _ = verl_loss(name, d64, agg, False, **actor)
    same, same_grad, _ = verl_loss(name, d32, agg, False, **actor)
    if packed:
        m = d32["mask"]
        cu = torch.cat([torch.zeros(1, dtype=torch.int64), m.sum(-1).cumsum(0)])
        logp = d32["logp"][m].clone().requires_grad_()
        res = policy_loss(logp, d32["old"][m], d32["adv"][m], cu_seqlens=cu, backend="triton",
                          agg=agg, **ours_kw)  # fmt: skip
        (g,) = torch.autograd.grad(res.loss, logp)
        grad = torch.zeros_like(d32["logp"]).masked_scatter_(m, g)
    else:
        res, grad = our_loss(d32, "triton", False, agg=agg, **ours_kw)
    assert_close_to_ref(res.loss, want, same, msg=f"{name} loss")
    assert_close_to_ref(grad, want_grad, same_grad, msg=f"{name} grad")


KL_NAMES = [("k1", "kl"), ("k2", "mse"), ("k3", "low_var_kl"), ("abs", "abs"), ("k3+", "k3+"),
            ("k3+", "low_var_kl+")]  # fmt: skip


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kl, verl_name", KL_NAMES)
def test_kl_matches_verl_kl_penalty(kl, verl_name, backend):
    # A = 0 and beta = 1: the loss is the token-mean of the KL estimator alone, its gradient the
    # estimator's (straight-through for k3+: k2's gradient, k3's value)
    d = batch(seed=30)
    d["adv"] = torch.zeros_like(d["adv"])
    dtype = torch.float32 if backend == "triton" else torch.float64
    results = {}
    for dt in {dtype, torch.float64}:
        logp = d["logp"].to(dt).clone().requires_grad_()
        est = kl_penalty(logp, d["ref"].to(dt), verl_name)
        loss = agg_loss(est, d["mask"].to(dt), "token-mean")
        results[dt] = (loss.detach(), torch.autograd.grad(loss, logp)[0])
    dd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in d.items()}
    res, grad = our_loss(dd, backend, False, kl=kl, beta=1.0)
    (want, want_grad), (same, same_grad) = results[torch.float64], results[dtype]
    assert_close_to_ref(res.loss, want, same, msg=f"{kl} loss")
    assert_close_to_ref(grad, want_grad, same_grad, msg=f"{kl} grad")
    assert_close_to_ref(res.kl, want, same, msg=f"{kl} metric")
