"""loss_type clip_cov and kl_cov against verl 0.9.1's own compute_policy_loss_clip_cov and
compute_policy_loss_kl_cov (verl.trainer.ppo.core_algos, CPU, through get_policy_loss_fn).

Runs in its own virtual environment (.ci/run's verl group); elsewhere the module is skipped.
Settings mapped: clip_ratio_low / _high -> eps_low / eps_high; policy_loss.clip_cov_ratio /
clip_cov_lb / clip_cov_ub / kl_cov_ratio -> the same names; policy_loss.ppo_kl_coef ->
kl_cov_coef; rollout_is_weights w -> rollout_logp = old - log w with is_cap=None.

The random draw: verl permutes its candidates with torch.randperm (the global generator); ours
takes the candidates of the smallest of one uniform key per position (policy_loss_cov.py). The
test hands verl the permutation that orders its candidates by our keys, so that both choose the
same tokens from the same draw; verl's band is what it counts (randperm's argument is checked).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("verl")

from helpers import F64_ATOL, assert_close, assert_close_to_ref  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402
from verl.workers.config.actor import PolicyLossConfig as VerlPolicyLossConfig  # noqa: E402

from papo_fast import policy_loss  # noqa: E402

pytestmark = pytest.mark.verl

B, L = 16, 29
ALONE = {"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None,
         "loss_scale_factor": None}  # fmt: skip
SEED = 1234  # our generator's, whose keys verl's permutation is made from


def batch(seed: int = 0) -> dict:
    """Ragged right-padded rows, advantages per row broadcast as verl passes them, log-ratios
    across both clip edges, rollout weights in (0, 2); float64."""
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    mask = torch.arange(L)[None, :] < lengths[:, None]
    logp = -3 * torch.rand(B, L, **f64)
    old = logp + 0.3 * torch.randn(B, L, **f64)
    adv = 1.5 * torch.randn(B, 1, **f64) * mask
    weights = 0.05 + 1.9 * torch.rand(B, L, **f64)
    return dict(logp=logp, old=old, adv=adv.expand(B, L).clone(), weights=weights, mask=mask)


def our_keys(shape) -> torch.Tensor:
    """The keys policy_loss draws from torch.Generator().manual_seed(SEED) (policy_loss_cov.py)."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)


def verl_candidates(d: dict, eps_low, eps_high, lb, ub) -> torch.Tensor:
    """[n, 2] the positions verl's clip-cov draws from, in its order (torch.nonzero's)."""
    lp, a, m = d["logp"], d["adv"], d["mask"]
    ratio = torch.exp(lp - d["old"])
    pg1, pg2 = -a * ratio, -a * ratio.clamp(1 - eps_low, 1 + eps_high)
    cov = (a - a[m].mean()) * (lp - lp[m].mean())
    return torch.nonzero(m & ~(pg2 > pg1) & (cov > lb) & (cov < ub))


def verl_loss(name: str, d: dict, agg: str, weighted: bool, monkeypatch, keys=None, **cov):
    """verl's loss, gradient and metrics; for clip_cov with torch.randperm answering the order
    of verl's candidates by our keys ([B, L]; default: those of the padded layout)."""
    eps_low, eps_high = 0.2, 0.28
    cfg = ActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=2,
                      loss_agg_mode=agg, clip_ratio_low=eps_low, clip_ratio_high=eps_high,
                      policy_loss=VerlPolicyLossConfig(loss_mode=name, **cov))  # fmt: skip
    cfg.global_batch_info.update(ALONE)
    if name == "clip_cov":
        lb, ub = cfg.policy_loss.clip_cov_lb, cfg.policy_loss.clip_cov_ub
        cand = verl_candidates(d, eps_low, eps_high, lb, ub)
        keys = our_keys(d["logp"].shape) if keys is None else keys
        order = torch.argsort(keys[cand[:, 0], cand[:, 1]], stable=True)
        assert len(cand) > 1, "the batch must give verl candidates to draw from"

        def randperm(n, *args, **kwargs):
            assert n == len(cand), f"verl draws from {n} candidates, we count {len(cand)}"
            return order

        monkeypatch.setattr(core_algos.torch, "randperm", randperm)
    logp = d["logp"].clone().requires_grad_()
    loss, metrics = core_algos.get_policy_loss_fn(name)(
        old_log_prob=d["old"], log_prob=logp, advantages=d["adv"], response_mask=d["mask"],
        loss_agg_mode=agg, config=cfg, rollout_is_weights=d["weights"] if weighted else None,
    )  # fmt: skip
    monkeypatch.undo()
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad, metrics


def our_loss(d: dict, backend: str, weighted: bool, packed: bool = False, **kw):
    """policy_loss on the batch (packed: its valid tokens, keys drawn over [T]), with the
    per-token outputs; (result, gradient laid out [B, L])."""
    m = d["mask"]
    rollout = d["old"] - d["weights"].log() if weighted else None
    gen = torch.Generator().manual_seed(SEED)
    logp = d["logp"].clone().requires_grad_()
    args = (logp, d["old"], d["adv"])
    if packed:
        cu = torch.cat([torch.zeros(1, dtype=torch.int64), m.sum(-1).cumsum(0)])
        args = tuple(t[m] for t in args)
        rollout = None if rollout is None else rollout[m]
        res = policy_loss(*args, cu_seqlens=cu, rollout_logp=rollout, is_cap=None,
                          backend=backend, per_token=True, generator=gen, **kw)  # fmt: skip
    else:
        res = policy_loss(*args, mask=m, rollout_logp=rollout, is_cap=None, backend=backend,
                          per_token=True, generator=gen, **kw)  # fmt: skip
    (grad,) = torch.autograd.grad(res.loss, logp)
    return res, grad


# (verl's policy_loss settings, ours): verl's defaults, and wider shares and bands
SETTINGS = {
    "clip_cov-default": ("clip_cov", {}, dict(loss_type="clip_cov")),
    "clip_cov-wide": ("clip_cov", dict(clip_cov_ratio=0.05, clip_cov_lb=0.1, clip_cov_ub=2.0),
                      dict(loss_type="clip_cov", clip_cov_ratio=0.05, clip_cov_lb=0.1,
                           clip_cov_ub=2.0)),
    "kl_cov-default": ("kl_cov", {}, dict(loss_type="kl_cov")),
    "kl_cov-wide": ("kl_cov", dict(kl_cov_ratio=0.05, ppo_kl_coef=1.5),
                    dict(loss_type="kl_cov", kl_cov_ratio=0.05, kl_cov_coef=1.5)),
}  # fmt: skip


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "rollout_is_weights"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_float64_matches_verl(setting, weighted, agg, monkeypatch):
    name, verl_kw, ours_kw = SETTINGS[setting]
    d = batch(seed=list(SETTINGS).index(setting))
    want, want_grad, metrics = verl_loss(name, d, agg, weighted, monkeypatch, **verl_kw)
    res, grad = our_loss(d, "torch", weighted, agg=agg, eps_low=0.2, eps_high=0.28, **ours_kw)
    assert_close(res.loss, want, atol=F64_ATOL, msg=f"{setting} loss")
    assert_close(grad, want_grad, atol=F64_ATOL, msg=f"{setting} grad")
    chosen = res.per_token.cov_select
    assert chosen.any() and not chosen[~d["mask"]].any()
    if name == "clip_cov":  # verl's pg_clipfrac: the share of the selected tokens
        frac = (chosen.sum() / res.num_tokens).item()
        # a float32 mean in verl (its flags are cast with .float()): one float32 rounding
        assert frac == pytest.approx(metrics["actor/pg_clipfrac"], abs=torch.finfo().eps)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("setting", ["clip_cov-wide", "kl_cov-wide"])
def test_triton_float32_matches_verl(setting, packed, monkeypatch):
    """Float32 inputs on the Triton kernel against verl in float64, the tolerance from verl's
    own float32 computation (tests/helpers.py's rule); the selection is made from the same
    float32 values on both sides. Packed, our keys are drawn over [T]: verl is handed the order
    of those at its candidates."""
    name, verl_kw, ours_kw = SETTINGS[setting]
    d32 = {k: v.float() if v.is_floating_point() else v for k, v in batch(seed=40).items()}
    d64 = {k: v.double() if v.is_floating_point() else v for k, v in d32.items()}
    keys = None
    if packed:  # keys over [T], seen by verl at the valid positions of [B, L]
        m = d32["mask"]
        keys = torch.full(m.shape, 2.0, dtype=torch.float64)
        keys[m] = our_keys(int(m.sum()))
    want, want_grad, _ = verl_loss(name, d64, "token-mean", True, monkeypatch, keys, **verl_kw)
    same, same_grad, _ = verl_loss(name, d32, "token-mean", True, monkeypatch, keys, **verl_kw)
    res, grad = our_loss(d32, "triton", True, packed=packed, eps_low=0.2, eps_high=0.28,
                         **ours_kw)  # fmt: skip
    assert_close_to_ref(res.loss, want, same, msg=f"{setting} loss")
    assert_close_to_ref(grad, want_grad, same_grad, msg=f"{setting} grad")
