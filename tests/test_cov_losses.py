"""loss_type clip_cov and kl_cov: the float64 reference on both backends and layouts in fp32 and
bf16 (loss, gradient, metrics and the selected tokens), a hand-computed case, the generator's
reproducibility, the settings' checks, and fused_linear_policy_loss selecting over the whole
batch. verl's own functions: tests/test_verl_cov.py."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import F64_ATOL, assert_close, assert_close_to_ref, make_batch, ours

from papo_fast import policy_loss
from papo_fast.kernels.fused_linear_policy_loss import fused_linear_policy_loss
from papo_fast.kernels.loss_config import PolicyLossConfig
from papo_fast.kernels.policy_loss_ref import aggregate_ref, policy_loss_ref, policy_loss_terms_ref

BACKENDS = ["torch", "triton"]
SEED = 99
# shares and bands wide enough that a few percent of the tokens are selected
COV = {
    "clip_cov": dict(loss_type="clip_cov", clip_cov_ratio=0.03, clip_cov_lb=0.2, clip_cov_ub=3.0),
    "kl_cov": dict(loss_type="kl_cov", kl_cov_ratio=0.03, kl_cov_coef=0.7),
}


def keys_of(d: dict, packed: bool) -> torch.Tensor:
    """The keys policy_loss draws from a generator seeded SEED, laid out [B, L] for the
    reference: drawn over [T] when packed (the valid tokens in order), over [B, L] otherwise."""
    g = torch.Generator().manual_seed(SEED)
    m = d["mask"]
    if not packed:
        return torch.rand(m.shape, generator=g, dtype=torch.float64)
    keys = torch.full(m.shape, 2.0, dtype=torch.float64)
    keys[m] = torch.rand(int(m.sum()), generator=g, dtype=torch.float64)
    return keys


def reference(d: dict, dtype: torch.dtype, keys: torch.Tensor, **kw):
    """policy_loss_ref on the same (rounded) inputs computed in ``dtype``: (result, grad)."""
    logp = d["logp"].to(dtype).clone().requires_grad_()
    res = policy_loss_ref(logp, d["old"], d["adv"], d["mask"], ref_logp=d["ref"],
                          rollout_logp=d["rollout"], cov_keys=keys, **kw)  # fmt: skip
    (grad,) = torch.autograd.grad(res.loss, logp)
    return res, grad


def terms64(d: dict, keys: torch.Tensor, **kw):
    """The reference's per-token terms in float64 (its selection is made in float64 whatever
    the inputs' dtype)."""
    with torch.no_grad():
        return policy_loss_terms_ref(
            d["logp"].double(), d["old"], d["adv"], d["mask"], ref_logp=d["ref"],
            rollout_logp=d["rollout"], cov_keys=keys, **kw,
        )  # fmt: skip


def selected_ref(d: dict, keys: torch.Tensor, **kw) -> torch.Tensor:
    """The reference's selection [B, L]."""
    return terms64(d, keys, **kw).cov_select


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", list(COV))
def test_cov_losses_match_reference(loss_type, backend, packed, dtype):
    kw = dict(COV[loss_type], beta=0.1, agg="seq-mean-token-mean")
    d = make_batch(6, 333, dtype=dtype, seed=21)
    keys = keys_of(d, packed)
    gen = torch.Generator().manual_seed(SEED)
    res, grad = ours(d, packed=packed, backend=backend, per_token=True, generator=gen, **kw)
    m = d["mask"]
    want_sel = selected_ref(d, keys, **kw)
    got_sel = res.per_token.cov_select
    if packed:
        got_sel = torch.zeros_like(m).masked_scatter_(m, got_sel)
    assert want_sel.sum() >= 10, "the batch must select tokens"
    assert torch.equal(got_sel, want_sel), "the selected tokens differ from the reference's"
    want, grad64 = reference(d, torch.float64, keys, **kw)
    same, grad_lo = reference(d, dtype, keys, **kw)
    # the loss aggregated over |loss_t|: the scale of its rounding (a loss that nearly cancels
    # rounds relative to its terms)
    scale = aggregate_ref(terms64(d, keys, **kw).loss.abs(), m, kw["agg"]).item()
    assert_close_to_ref(res.loss, want.loss, same.loss, scale=scale, msg="loss")
    assert_close_to_ref(grad, grad64, grad_lo, msg="grad")
    for name in res._fields[1:-1]:
        want_m, same_m = getattr(want, name).detach(), getattr(same, name).detach()
        assert_close_to_ref(getattr(res, name), want_m, same_m, msg=name)
    if loss_type == "clip_cov":  # the selected tokens keep only their KL term: pg is 0
        pt, sel = res.per_token, res.per_token.cov_select
        # 0 + beta * KL_t: one float32 rounding of the product either way
        eps = torch.finfo(torch.float32).eps
        assert_close(pt.loss[sel], 0.1 * pt.kl[sel], atol=0.0, rtol=2 * eps, msg="selected loss")


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_cov_hand_computed(backend):
    # Four valid tokens, A = (2, 2, -1, -1) (two sequences of two), logp = (-1, -0.5, -2, -0.1):
    # mean A = 0.5, mean logp = -0.9; cov = (1.5 * -0.1, 1.5 * 0.4, -1.5 * -1.1, -1.5 * 0.8) =
    # (-0.15, 0.6, 1.65, -1.2). kl_cov_ratio 0.25 of 4 tokens selects 1: the third (cov 1.65).
    # old = logp - (0.1, -0.2, 0.3, 0): ratios e^0.1, e^-0.2, e^0.3, 1; the third token's loss is
    # -A ρ + c |logp - old| = e^0.3 + 2 * 0.3 with c = 2, its gradient e^0.3 + 2 (log-ratio > 0).
    lp = torch.tensor([[-1.0, -0.5], [-2.0, -0.1]], dtype=torch.float64, requires_grad=True)
    old = lp.detach() - torch.tensor([[0.1, -0.2], [0.3, 0.0]], dtype=torch.float64)
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    mask = torch.ones(2, 2, dtype=torch.bool)
    kw = dict(loss_type="kl_cov", kl_cov_ratio=0.25, kl_cov_coef=2.0, agg="token-sum")
    res = policy_loss(lp, old, adv, mask=mask, backend=backend, per_token=True, **kw)
    (g,) = torch.autograd.grad(res.loss, lp)
    e = math.exp
    want_tok = [[-2 * e(0.1), -2 * e(-0.2)], [e(0.3) + 0.6, 1.0]]
    want_grad = [[-2 * e(0.1), -2 * e(-0.2)], [e(0.3) + 2.0, 1.0]]
    tol = 1e-6 if backend == "triton" else F64_ATOL  # the kernel computes in float32
    assert res.per_token.cov_select.tolist() == [[False, False], [True, False]]
    assert_close(res.per_token.loss, torch.tensor(want_tok, dtype=torch.float64), atol=tol)
    assert_close(g, torch.tensor(want_grad, dtype=torch.float64), atol=tol)
    assert_close(res.loss, torch.tensor(want_tok, dtype=torch.float64).sum(), atol=tol)
    assert res.clip_frac_low.item() == res.clip_frac_high.item() == 0.0  # kl_cov never clips


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_cov_draw_follows_the_generator(backend):
    """The same seed selects the same tokens; another seed other ones (many candidates, few
    chosen); the draw never leaves the band's candidates (the reference's with any keys)."""
    d = make_batch(6, 333, dtype=torch.float32, seed=5)
    kw = dict(COV["clip_cov"], clip_cov_ratio=0.01)

    def chosen(seed):
        gen = torch.Generator().manual_seed(seed)
        return ours(d, backend=backend, per_token=True, generator=gen, **kw)[0].per_token

    a, b, c = chosen(1).cov_select, chosen(1).cov_select, chosen(2).cov_select
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.sum() == c.sum() == math.floor(0.01 * int(d["mask"].sum()))
    everything = selected_ref(d, torch.rand(d["mask"].shape, dtype=torch.float64),
                              **dict(kw, clip_cov_ratio=1.0))  # fmt: skip
    assert not (a & ~everything).any() and not (c & ~everything).any()


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(clip_cov_ratio=0.0), r"clip_cov_ratio must be in \(0, 1\], got 0.0"),
        (dict(kl_cov_ratio=1.5), r"kl_cov_ratio must be in \(0, 1\], got 1.5"),
        (dict(clip_cov_lb=2.0, clip_cov_ub=1.0), r"clip_cov_ub leaves clip_cov's band empty"),
        (dict(clip_cov_lb=6.0), r"clip_cov_lb leaves clip_cov's band empty: clip_cov_lb < clip_"),
        (dict(clip_cov_lb=float("nan")), r"clip_cov_lb must be a finite number"),
        (dict(kl_cov_coef=-0.1), r"kl_cov_coef must be >= 0, got -0.1"),
        (dict(loss_type="clip_cov", ratio_level="sequence"), r"takes the token ratio only"),
        (dict(loss_type="kl_cov", dual_clip=3.0), r"dual_clip bounds PPO's clipped loss"),
    ],
)
def test_cov_settings_are_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        PolicyLossConfig(**kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_kl_cov_selects_over_the_whole_batch(backend):
    """fused_linear_policy_loss with a covariance type takes its two-pass path: the selection
    is over the whole batch, as policy_loss's on the same log-probs (one call, every token)."""
    g = torch.Generator().manual_seed(3)
    b, length, h, v = 5, 60, 16, 97
    d = make_batch(b, length, dtype=torch.float64, seed=8)
    hidden = torch.randn(b, length, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5
    targets = torch.randint(0, v, (b, length), generator=g)
    kw = dict(COV["kl_cov"], mask=d["mask"], backend=backend)
    res = fused_linear_policy_loss(hidden, weight, targets, d["old"], d["adv"], **kw)
    logp = res.logp.clone().requires_grad_()
    direct = policy_loss(logp, d["old"], d["adv"], **kw)
    tol = 1e-6 if backend == "triton" else F64_ATOL  # the kernel computes in float32
    assert_close(res.loss, direct.loss, atol=tol)
    (g_logp,) = torch.autograd.grad(direct.loss, logp)
    (g_hidden,) = torch.autograd.grad(res.loss, hidden)
    # d loss / d hidden = d loss / d logp times d logp / d hidden: the same chain through autograd
    (want,) = torch.autograd.grad(
        torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[..., None]).squeeze(-1),
        hidden, grad_outputs=g_logp,
    )  # fmt: skip
    assert_close(g_hidden, want, atol=tol)
