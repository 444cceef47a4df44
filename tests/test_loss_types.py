"""The policy-loss types (loss_type cispo / sapo / gpg), the KL estimators abs and k3+, the KL's
ratio correction and the token-sum aggregation: hand-computed cases, the float64 reference on both
backends and layouts, low precision, gradients, micro-batches, the settings' checks, and
liger-kernel's own loss function (its chunked GRPO loss's per-chunk ``ppo_loss_fn``)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    F64_ATOL,
    assert_close,
    assert_close_to_ref,
    assert_matches_reference,
    cu_of,
    gradcheck_fresh,
    loss_scale,
    make_batch,
    ours,
    pack,
    theirs,
)

from papo_fast import policy_loss
from papo_fast.kernels.loss_config import COV_TYPES, LOSS_TYPES, PolicyLossConfig

BACKENDS = ["torch", "triton"]
NEW_TYPES = [t for t in LOSS_TYPES if t not in ("ppo", *COV_TYPES)]  # cov types: test_cov_losses.py


def tiny(logp, old, adv, backend="torch", **kw):
    """policy_loss on one sequence of float64 tokens, all valid: (loss, d loss / d logp)."""
    x = torch.tensor([logp], dtype=torch.float64, requires_grad=True)
    old_t = torch.tensor([old], dtype=torch.float64)
    res = policy_loss(
        x, old_t, torch.tensor([adv], dtype=torch.float64), mask=torch.ones_like(x, dtype=bool),
        backend=backend, **kw,
    )  # fmt: skip
    (g,) = torch.autograd.grad(res.loss, x)
    return res, g


# ---------------------------------------------------------- hand-computed cases

LN2 = math.log(2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_cispo(backend):
    # ratios 2, 1 and 0.5 with eps 0.2 / 0.28: the weights are 1.28, 1 and 0.8, for either sign
    # of A; the loss is -w * A * logp, its gradient -w * A (the weight is detached).
    lp = [-1.0, -2.0, -0.5]
    old = [-1.0 - LN2, -2.0, -0.5 + LN2]
    for adv in (1.5, -1.5):
        res, g = tiny(lp, old, adv, backend, loss_type="cispo")
        w = torch.tensor([1.28, 1.0, 0.8], dtype=torch.float64)
        x = torch.tensor(lp, dtype=torch.float64)
        tol = 1e-6 if backend == "triton" else F64_ATOL  # the kernel computes in float32
        assert_close(res.loss, (-w * adv * x).mean(), atol=tol, msg=f"A={adv}: loss")
        assert_close(g, (-w * adv / 3)[None], atol=tol, msg=f"A={adv}: grad")
        # clipped for any A: one token above 1 + eps_high, one below 1 - eps_low
        assert res.clip_frac_high.item() == pytest.approx(1 / 3)
        assert res.clip_frac_low.item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_cispo_without_lower_bound(backend):
    # eps_low = 1: the lower bound is 0, so a ratio of 0.5 keeps its weight 0.5
    res, g = tiny([-1.0], [-1.0 + LN2], 2.0, backend, loss_type="cispo", eps_low=1.0)
    assert_close(res.loss, torch.tensor(-0.5 * 2.0 * -1.0, dtype=torch.float64), atol=1e-6)
    assert_close(g, torch.tensor([[-1.0]], dtype=torch.float64), atol=1e-6)
    assert res.clip_frac_low.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_sapo(backend):
    # At ratio 1 the gate is sigmoid(0) * 4 / tau = 2 / tau and its slope 4 * 1/4 * 1 = 1 for any
    # tau: the loss is -2A/tau, the gradient -A (the on-policy policy gradient).
    for adv, tau in ((2.0, 1.0), (-2.0, 1.05)):
        res, g = tiny([-1.0], [-1.0], adv, backend, loss_type="sapo")
        assert_close(res.loss, torch.tensor(-2 * adv / tau, dtype=torch.float64), atol=1e-6)
        assert_close(g, torch.tensor([[-adv]], dtype=torch.float64), atol=1e-6)
    # ratio 2, A = 1, tau_pos = 0.5: gate sigmoid(0.5) * 8; slope 4 s (1 - s) * 2
    s = 1 / (1 + math.exp(-0.5))
    res, g = tiny([-1.0], [-1.0 - LN2], 1.0, backend, loss_type="sapo", sapo_tau_pos=0.5)
    assert_close(res.loss, torch.tensor(-8 * s, dtype=torch.float64), atol=1e-6)
    assert_close(g, torch.tensor([[-8 * s * (1 - s)]], dtype=torch.float64), atol=1e-6)
    assert res.clip_frac_low.item() == res.clip_frac_high.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_gpg(backend):
    # -A * logp whatever the ratio (here 4): A = -1.5, logp = -2 give -3, gradient -A = 1.5
    res, g = tiny([-2.0], [-2.0 - 2 * LN2], -1.5, backend, loss_type="gpg")
    assert_close(res.loss, torch.tensor(-3.0, dtype=torch.float64), atol=1e-6)
    assert_close(g, torch.tensor([[1.5]], dtype=torch.float64), atol=1e-6)
    assert res.ratio_mean.item() == pytest.approx(4.0)  # the ratio is still reported
    assert res.clip_frac_low.item() == res.clip_frac_high.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kl, value, slope",
    [
        # delta = logp - ref = -0.5: |delta| = 0.5, slope sign(delta) = -1
        ("abs", 0.5, -1.0),
        # k3's value e^0.5 - 1.5, k2's slope delta = -0.5 (not k3's 1 - e^0.5)
        ("k3+", math.exp(0.5) - 1.5, -0.5),
    ],
)
def test_hand_kl_estimators(backend, kl, value, slope):
    x = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-0.5]], dtype=torch.float64)
    res = policy_loss(
        x, None, torch.zeros(1, dtype=torch.float64), mask=torch.ones(1, 1, dtype=bool),
        ref_logp=ref, beta=1.0, kl=kl, backend=backend,
    )  # fmt: skip
    (g,) = torch.autograd.grad(res.loss, x)
    assert_close(res.loss, torch.tensor(value, dtype=torch.float64), atol=1e-6)
    assert_close(g, torch.tensor([[slope]], dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_kl_ratio_correction(backend):
    # ratio 2, delta = -0.5, k1: the term is 2 * -0.5 = -1; its slope d(ratio * delta) =
    # ratio * (delta + 1) = 1. A = 0 leaves the KL term alone.
    x = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
    one = lambda v: torch.tensor([[v]], dtype=torch.float64)  # noqa: E731
    res = policy_loss(
        x, one(-1.0 - LN2), torch.zeros(1, dtype=torch.float64),
        mask=torch.ones(1, 1, dtype=bool), ref_logp=one(-0.5), beta=1.0, kl="k1",
        kl_ratio_correction=True, backend=backend,
    )  # fmt: skip
    (g,) = torch.autograd.grad(res.loss, x)
    assert_close(res.loss, torch.tensor(-1.0, dtype=torch.float64), atol=1e-6)
    assert_close(g, one(1.0), atol=1e-6)
    assert_close(res.kl, torch.tensor(-1.0, dtype=torch.float64), atol=1e-6)  # as in the loss


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_token_sum(backend):
    # token-sum: no division. Two sequences of 2 and 1 valid tokens, on-policy, A = 1 and -2:
    # loss = -(1 + 1) + 2 = 0 with counts ignored; gradient -A per token
    x = torch.full((2, 2), -1.0, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True], [True, False]])
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    res = policy_loss(x, None, adv, mask=mask, agg="token-sum", num_tokens=999, backend=backend)
    (g,) = torch.autograd.grad(res.loss, x)
    assert_close(res.loss, torch.tensor(0.0, dtype=torch.float64), atol=1e-6)
    assert_close(g, torch.tensor([[-1.0, -1.0], [2.0, 0.0]], dtype=torch.float64), atol=1e-6)


# -------------------------------------------------------- against the reference

CASES = [  # (loss_type, kl, kl_ratio_correction, agg): every type, estimator and aggregation once
    ("cispo", "k3", False, "token-mean"),
    ("cispo", "abs", True, "token-sum"),
    ("sapo", "k3+", False, "seq-mean-token-mean"),
    ("sapo", "k1", True, "seq-mean-token-sum"),
    ("gpg", "k2", False, "seq-mean-token-sum-norm"),
    ("gpg", "k3+", True, "token-sum"),
    ("ppo", "abs", False, "token-sum"),
    ("ppo", "k3", True, "token-mean"),
    ("ppo", "k3+", True, "seq-mean-token-mean"),
]
IDS = ["-".join(map(str, c)) for c in CASES]


def settings(case, **extra) -> dict:
    loss_type, kl, corr, agg = case
    return dict(loss_type=loss_type, kl=kl, kl_ratio_correction=corr, agg=agg, beta=0.1) | extra


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("per_token", [False, True], ids=["adv-seq", "adv-tok"])
def test_float64_matches_reference(case, per_token):
    d = make_batch(per_token=per_token, seed=CASES.index(case))
    kw = settings(case, is_cap=1.5)
    res, grad = ours(d, **kw)
    want, ref_grad = theirs(d, **kw)
    assert_close(res.loss, want.loss, atol=F64_ATOL, msg="loss")
    assert_close(grad, ref_grad, atol=F64_ATOL, msg="grad")
    for name in res._fields[1:]:
        assert_close(getattr(res, name), getattr(want, name), atol=F64_ATOL, msg=name)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_backends_match_reference(case, packed, backend):
    k = CASES.index(case)
    d = make_batch(b=4, length=300, dtype=torch.float32, seed=11 + k, per_token=k % 2 == 1)
    d["mask"][1] = False  # an empty response
    kw = settings(case, backend=backend)
    res, grad = ours(d, packed=packed, **kw)
    assert_matches_reference(res, grad, d, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_type", NEW_TYPES)
def test_low_precision_inputs(backend, dtype, loss_type):
    d = make_batch(b=3, length=77, dtype=dtype, seed=5)
    kw = dict(loss_type=loss_type, beta=0.1, kl="k3+", backend=backend)
    res, grad = ours(d, **kw)
    assert grad.dtype == dtype
    assert_matches_reference(res, grad, d, **kw)


# cispo's weight and k3+'s value are detached by design (their gradient is not the loss's
# derivative): the reference's autograd and the hand cases check them; here cispo is left out and
# k3+ becomes k3.
GRADCHECK = [c for c in CASES if c[0] != "cispo"]


@pytest.mark.parametrize("case", GRADCHECK, ids=["-".join(map(str, c)) for c in GRADCHECK])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_gradcheck(case, packed):
    d = make_batch(b=3, length=5, per_token=True, seed=2)
    m = d["mask"]
    kw = settings(case, is_cap=1.5)
    kw["kl"] = "k3" if kw["kl"] == "k3+" else kw["kl"]
    layout = dict(cu_seqlens=cu_of(m)) if packed else dict(mask=m)
    old, adv, ref, rollout = (
        pack(d[k], m) if packed else d[k] for k in ("old", "adv", "ref", "rollout")
    )
    x = pack(d["logp"], m) if packed else d["logp"]

    def fn(lp):
        return policy_loss(lp, old, adv, ref_logp=ref, rollout_logp=rollout, **layout, **kw).loss

    assert gradcheck_fresh(fn, x.clone().requires_grad_())


MICRO = [(c, "torch", torch.float64) for c in CASES] + [
    (c, "triton", torch.float32) for c in CASES[:4]
]


@pytest.mark.parametrize(
    "case, backend, dtype", MICRO, ids=[f"{m[1]}-{'-'.join(map(str, m[0]))}" for m in MICRO]
)
def test_micro_batch_invariance(case, backend, dtype):
    d = make_batch(b=8, length=40, seed=3, dtype=dtype)
    d["mask"][5] = False
    m = d["mask"]
    kw = settings(case, backend=backend, num_tokens=int(m.sum()), num_seqs=8, max_len=40)
    ref_kw = {k: v for k, v in kw.items() if k != "backend"}
    want, grad64 = theirs(d, **ref_kw)
    same, grad_lo = theirs(d, dtype=dtype, **ref_kw)
    for splits in (1, 2, 4):
        total, grads = 0.0, []
        for rows in torch.arange(8).chunk(splits):
            res, g = ours({k: v[rows] for k, v in d.items()}, packed=splits == 2, **kw)
            total = total + res.loss
            grads.append(g)
        msg = f"{splits} micro-batches"
        scale = loss_scale(d, **ref_kw)
        assert_close_to_ref(total, want.loss, same.loss, scale=scale, msg=f"{msg}: loss")
        assert_close_to_ref(torch.cat(grads), grad64, grad_lo, msg=f"{msg}: grad")


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(loss_type="grpo"), r"loss_type must be one of \('ppo', 'cispo', 'sapo'"),
        (dict(kl="low_var_kl"), r"kl must be one of"),
        (dict(agg="token_sum"), r"agg must be one of"),
        (dict(loss_type="sapo", ratio_level="sequence"), r"loss_type='sapo' takes the token"),
        (dict(loss_type="gpg", ratio_level="sequence"), r"loss_type='gpg' takes the token"),
        (dict(loss_type="cispo", dual_clip=3.0), r"dual_clip bounds PPO.*'cispo'.*3.0"),
        (dict(kl_ratio_correction=True, ratio_level="sequence"), r"kl_ratio_correction"),
        (dict(kl_ratio_correction=1), r"kl_ratio_correction must be True or False, got 1"),
        (dict(eps_low=1.0), r"eps_low must be in \[0, 1\), got 1.0"),
        (dict(loss_type="cispo", eps_low=1.5), r"eps_low must be in \[0, 1\] for cispo"),
        (dict(loss_type="sapo", sapo_tau_neg=0.0), r"sapo_tau_neg must be > 0, got 0.0"),
        (dict(sapo_tau_pos=float("nan")), r"sapo_tau_pos must be a finite number"),
    ],
)
def test_bad_settings_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        PolicyLossConfig(**kw)


def test_token_sum_ignores_counts_and_needs_none():
    # token-sum has no denominator: the caller's counts change nothing, local or global
    d = make_batch(b=3, length=20, seed=9)
    alone, g1 = ours(d, agg="token-sum")
    counted, g2 = ours(d, agg="token-sum", num_tokens=7, num_seqs=2, max_len=3)
    assert_close(alone.loss, counted.loss, atol=0.0)
    assert_close(g1, g2, atol=0.0)


# ---------------------------------------------------------------- liger-kernel

# liger-kernel's ppo_loss_fn computes one chunk's loss from per-token log-probs: its own formulas,
# called directly on the same float64 data. Its settings in ours:
#   cispo: epsilon_high = E (an absolute bound on the ratio, no lower bound)
#          -> loss_type="cispo", eps_high=E - 1, eps_low=1 (lower bound 0)
#   sapo:  sapo_temperature_pos / _neg -> sapo_tau_pos / sapo_tau_neg; its aggregation divides
#          each sequence's token mean by the batch's B -> agg="seq-mean-token-mean", num_seqs=B
#   dapo (clipped ratio): epsilon_low / _high -> eps_low / eps_high, token-mean
#   use_bias_correction_kl -> kl_ratio_correction (its KL is k3; the ratio is not detached)
#   vllm_is_ratio -> the truncated weight min(exp(old - rollout), is_cap), given precomputed


def liger_loss(d: dict, loss_type: str, **kw):
    """liger-kernel's ppo_loss_fn on a padded batch, in its dtype: (loss, metrics, d loss / d
    logp)."""
    from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOFunction

    logp = d["logp"].clone().requires_grad_()
    mask = d["mask"].to(logp.dtype)
    loss, metrics = LigerFusedLinearGRPOFunction.ppo_loss_fn(
        logp, mask, d["adv"], mask, ref_per_token_logps=d["ref"], old_per_token_logps=d["old"],
        loss_type=loss_type, **kw,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(loss, logp)
    return loss, metrics, grad


LIGER = {  # our settings -> liger-kernel's
    "cispo": (
        dict(loss_type="cispo", eps_low=1.0, eps_high=0.2),
        dict(loss_type="cispo", epsilon_high=1.2),
    ),
    "sapo": (
        dict(loss_type="sapo", sapo_tau_pos=0.7, sapo_tau_neg=1.3, agg="seq-mean-token-mean"),
        dict(loss_type="sapo", sapo_temperature_pos=0.7, sapo_temperature_neg=1.3),
    ),
    "ppo": (
        dict(eps_low=0.2, eps_high=0.28),
        dict(loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28),
    ),  # fmt: skip
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("correction", [False, True], ids=["kl", "kl-ratio-corrected"])
@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "ppo"])
def test_matches_liger_kernel(loss_type, correction, packed, backend):
    pytest.importorskip("liger_kernel")
    d = make_batch(b=5, length=57, seed=21) | {"rollout": None}
    d["adv"] = 2 * d["adv"]
    theirs_kw = LIGER[loss_type][1] | dict(beta=0.04, use_bias_correction_kl=correction)
    kw = LIGER[loss_type][0] | dict(beta=0.04, kl="k3", kl_ratio_correction=correction)
    kw |= dict(num_seqs=5)  # liger's "sapo" divides by B, empty sequences included
    want, metrics, want_grad = liger_loss(d, **theirs_kw)
    # Each backend in its own dtype: the kernel computes in float32, so its tolerance is liger's
    # own float32 error against liger in float64.
    dtype = torch.float32 if backend == "triton" else torch.float64
    d_in = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in d.items()}  # fmt: skip
    same, same_metrics, same_grad = liger_loss(d_in, **theirs_kw)
    res, grad = ours(d_in, packed=packed, backend=backend, **kw)
    scale = loss_scale(d, **kw)
    assert_close_to_ref(res.loss, want, same.to(dtype), scale=scale, msg="loss")
    assert_close_to_ref(grad, want_grad, same_grad.to(dtype), msg="grad")
    # liger's KL metric: the term as in the loss, over the valid tokens (its clip metric counts
    # A > 0 only for cispo, ours any A: not compared)
    assert_close_to_ref(res.kl, metrics[0], same_metrics[0].to(dtype), msg="kl metric")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["cispo", "sapo"])
def test_rollout_weight_matches_liger_vllm_is_ratio(loss_type, backend):
    # liger's vllm_is_ratio is the truncated weight itself: min(exp(old - rollout), is_cap)
    pytest.importorskip("liger_kernel")
    d = make_batch(b=4, length=41, seed=23)
    weight = torch.exp(d["old"] - d["rollout"]).clamp(max=1.5)
    theirs_kw = LIGER[loss_type][1] | dict(beta=0.0, vllm_is_ratio=weight)
    want, _, want_grad = liger_loss(d, **theirs_kw)
    kw = LIGER[loss_type][0] | dict(is_cap=1.5, num_seqs=4, backend=backend)
    res, grad = ours(d, **kw)
    tol = F64_ATOL if backend == "torch" else None
    if tol is None:  # the kernel computes in float32: liger's own float32 error
        d32 = {k: v.float() if v.is_floating_point() else v for k, v in d.items()}
        theirs_kw["vllm_is_ratio"] = weight.float()
        same, _, same_grad = liger_loss(d32, **theirs_kw)
        res, grad = ours(d32, **kw)
        scale = loss_scale(d, **{k: v for k, v in kw.items() if k != "backend"})
        assert_close_to_ref(res.loss, want, same, scale=scale, msg="loss")
        assert_close_to_ref(grad, want_grad, same_grad, msg="grad")
    else:
        assert_close(res.loss, want, atol=tol, msg="loss")
        assert_close(grad, want_grad, atol=tol, msg="grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", NEW_TYPES)
@pytest.mark.parametrize("old", [True, False], ids=["old", "on-policy"])
@pytest.mark.parametrize("beta", [0.0, 0.1], ids=["no-kl", "kl"])
def test_masked_garbage_changes_nothing(loss_type, old, beta, backend):
    # cispo and gpg multiply by logp itself: -inf at masked positions (on-policy, without KL and
    # rollout weights, no log-ratio, delta or weight carries it) must not leak in as inf * 0 = NaN
    d = make_batch(b=3, length=20, seed=1)
    results = []
    for garbage in (False, True):
        lp = d["logp"].clone()
        if garbage:
            lp[~d["mask"]] = -math.inf
        batch = d | {"logp": lp, "old": d["old"] if old else None, "rollout": None}
        kw = dict(loss_type=loss_type, beta=beta, kl="abs", kl_ratio_correction=True)
        res, grad = ours(batch, backend=backend, **kw)
        results.append((res.loss, grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
