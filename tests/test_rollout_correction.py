"""Rollout correction beyond the token weight: one weight per sequence (``is_level``), rollout
rejection (``rollout_rs`` with ``rs_low`` / ``rs_high``) and the caller's own weights
(``rollout_is_weights``), against the float64 reference (policy_loss_ref.py), on both layouts and
both backends, and against liger-kernel's ``vllm_is_ratio`` given per sequence.

verl's own functions (rollout_corr_helper.py) are matched in tests/test_verl_rollout_corr.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    assert_close_to_ref,
    assert_matches_reference,
    cu_of,
    loss_scale,
    make_batch,
    ours,
    pack,
)

from papo_fast.kernels.loss_config import PolicyLossConfig
from papo_fast.kernels.policy_loss import policy_loss
from papo_fast.kernels.policy_loss_ref import policy_loss_ref, rollout_kept_ref

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16]

# Bands that reject a share of the batch on make_batch's data (rollout = old + 0.2 N(0, 1)): the
# token band ~ +-1.1 sigma, the sequence-sum band about the spread of a sum over ~20-60 tokens,
# the geometric-mean band about the spread of a mean.
SETTINGS = {
    "seq-weight": dict(is_level="sequence", is_cap=None),
    "seq-weight-capped": dict(is_level="sequence", is_cap=1.5, agg="seq-mean-token-mean"),
    "rs-token": dict(rollout_rs="token", rs_low=0.8, rs_high=1.25),
    "rs-sequence": dict(rollout_rs="sequence", rs_low=0.3, rs_high=3.0, is_level="sequence"),
    "rs-geometric-gspo": dict(
        rollout_rs="geometric",
        rs_low=0.97,
        rs_high=1.03,
        ratio_level="sequence",
        agg="seq-mean-token-sum-norm",
    ),  # fmt: skip
    "rs-token-seq-mean": dict(
        rollout_rs="token", rs_low=0.8, rs_high=1.25, agg="seq-mean-token-mean"
    ),
}


def _batch(seed: int, dtype=torch.float64, b: int = 7, length: int = 61) -> dict:
    return make_batch(b=b, length=length, dtype=dtype, seed=seed)


@pytest.mark.parametrize("name", [n for n in SETTINGS if "rollout_rs" in SETTINGS[n]])
def test_bands_reject_some_not_all(name):
    # the chosen bands bite: some valid tokens rejected, some kept (else the tests below test
    # nothing about rejection)
    kw = SETTINGS[name]
    d = _batch(1)
    kept = rollout_kept_ref(d["old"], d["rollout"], d["mask"], PolicyLossConfig(**kw))
    assert 0 < kept.sum() < d["mask"].sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("name", SETTINGS)
def test_matches_float64_reference(name, packed, dtype, backend):
    # loss, d loss / d logp and every metric against the float64 formula; tolerance from the
    # same formula in the inputs' dtype (assert_matches_reference)
    kw = SETTINGS[name]
    d = _batch(2, dtype)
    res, grad = ours(d, packed=packed, backend=backend, **kw)
    assert_matches_reference(res, grad, d, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["rs-token", "rs-sequence", "rs-geometric-gspo"])
def test_rejected_tokens_leave_loss_and_counts(name, backend):
    # rejection is the mask with the rejected tokens removed: the same loss, gradient and
    # num_tokens as no rejection on that smaller mask (verl replaces response_mask the same way)
    kw = SETTINGS[name]
    d = _batch(3, torch.float32)
    cfg = PolicyLossConfig(**kw)
    kept = rollout_kept_ref(d["old"].double(), d["rollout"].double(), d["mask"], cfg)
    rest = {k: v for k, v in kw.items() if k not in ("rollout_rs", "rs_low", "rs_high")}
    res, grad = ours(d, backend=backend, **kw)
    # the weights are per sequence over the caller's whole mask: given as the caller's own
    w = torch.exp(d["old"] - d["rollout"])
    if cfg.is_level == "sequence":
        log_w = ((d["old"] - d["rollout"]).double() * d["mask"]).sum(-1).clamp(-20, 20)
        w = torch.exp(log_w).float()[:, None]
    w = w if cfg.is_cap is None else w.clamp(max=cfg.is_cap)
    plain, plain_grad = ours(
        d | {"mask": kept, "rollout": None}, backend=backend,
        **{k: v for k, v in rest.items() if k != "is_level"}, rollout_is_weights=w,
    )  # fmt: skip
    assert res.num_tokens.item() == kept.sum().item()
    # float32 on both sides, the same operations but for the weight's rounding: a few ulps of
    # the loss's scale
    scale = loss_scale(d, **kw)
    assert torch.allclose(res.loss, plain.loss, atol=8 * 1.2e-7 * scale, rtol=0)
    assert torch.allclose(grad, plain_grad, atol=8 * 1.2e-7 * grad.abs().max().item(), rtol=0)
    assert (grad[d["mask"] & ~kept] == 0).all()


def _given_weights(d: dict, per: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    b, length = d["logp"].shape
    shape = (b,) if per == "seq" else (b, 1) if per == "seq2d" else (b, length)
    return (0.5 + torch.rand(shape, generator=g, dtype=torch.float64)).to(d["logp"].dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("per", ["seq", "seq2d", "token"])
def test_given_weights_match_reference(per, packed, dtype, backend):
    d = _batch(4, dtype)
    w = _given_weights(d, per)
    m = d["mask"]
    logp = d["logp"].clone().requires_grad_()
    wt = w if per != "token" or not packed else pack(w, m)
    if packed:
        res = policy_loss(
            pack(logp, m), pack(d["old"], m), d["adv"], cu_seqlens=cu_of(m),
            rollout_is_weights=wt, backend=backend,
        )  # fmt: skip
    else:
        res = policy_loss(logp, d["old"], d["adv"], mask=m, rollout_is_weights=w, backend=backend)
    (grad,) = torch.autograd.grad(res.loss, logp)

    def ref(dt):
        lp = d["logp"].to(dt).requires_grad_()
        r = policy_loss_ref(lp, d["old"], d["adv"], m, rollout_is_weights=w.to(dt))
        return r, torch.autograd.grad(r.loss, lp)[0]

    (want, g64), (same, glo) = ref(torch.float64), ref(dtype)
    assert_close_to_ref(res.loss, want.loss, same.loss, msg="loss")
    assert_close_to_ref(grad, g64, glo, msg="grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("name", ["seq-weight-capped", "rs-token", "rs-sequence"])
def test_micro_batches_with_global_counts_sum_to_full_batch(name, packed, backend):
    # whole sequences split over calls; the global counts are the KEPT tokens / sequences of
    # the whole batch (rollout_kept_ref, what a trainer counts before the step): the summed
    # micro-batch losses and gradients equal the one-call loss with the same counts
    kw = SETTINGS[name] | dict(agg="token-mean")
    d = _batch(6, torch.float32, b=8)
    kept = rollout_kept_ref(d["old"], d["rollout"], d["mask"], PolicyLossConfig(**kw))
    counts = dict(num_tokens=int(kept.sum()), num_seqs=int((kept.sum(-1) > 0).sum()), max_len=61)
    full, full_grad = ours(d, packed=packed, backend=backend, **kw, **counts)
    total, grads = 0.0, []
    for rows in (slice(0, 3), slice(3, 4), slice(4, 8)):
        part = {k: v[rows] if torch.is_tensor(v) else v for k, v in d.items()}
        res, g = ours(part, packed=packed, backend=backend, **kw, **counts)
        total, grads = total + res.loss, grads + [g]
    want = full.loss.double().abs().item()
    # float32 sums of the same terms in another order: a few float32 ulps of the loss's scale
    tol = 16 * torch.finfo(torch.float32).eps * max(want, loss_scale(d, **kw, **counts))
    assert abs(total.item() - full.loss.item()) <= tol
    assert torch.allclose(torch.cat(grads), full_grad, atol=1e-7 * full_grad.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sequence_weights_match_liger_vllm_is_ratio(backend):
    # liger-kernel's vllm_is_ratio of shape [B, 1] multiplies each sequence's per-token loss:
    # ours with rollout_is_weights [B, 1] (dapo: the clipped ratio, token-mean)
    pytest.importorskip("liger_kernel")
    from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOFunction

    def liger(d, w):
        logp = d["logp"].clone().requires_grad_()
        mask = d["mask"].to(logp.dtype)
        loss, _ = LigerFusedLinearGRPOFunction.ppo_loss_fn(
            logp, mask, d["adv"], mask, old_per_token_logps=d["old"], loss_type="dapo",
            epsilon_low=0.2, epsilon_high=0.28, beta=0.0, vllm_is_ratio=w,
        )  # fmt: skip
        return loss, torch.autograd.grad(loss, logp)[0]

    d64 = _batch(8) | {"rollout": None}
    w64 = _given_weights(d64, "seq2d")
    want, want_grad = liger(d64, w64)
    dtype = torch.float32 if backend == "triton" else torch.float64
    d = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
         for k, v in d64.items()}  # fmt: skip
    same, same_grad = liger(d, w64.to(dtype))
    res, grad = ours(
        d, backend=backend, eps_low=0.2, eps_high=0.28, rollout_is_weights=w64.to(dtype)
    )
    assert_close_to_ref(res.loss, want, same, msg="loss")
    assert_close_to_ref(grad, want_grad, same_grad, msg="grad")


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(rollout_rs="seq"), r"rollout_rs must be one of"),
        (dict(is_level="geometric"), r"is_level must be one of"),
        (dict(rs_low=0.0), r"rs_low must be > 0, got 0.0"),
        (dict(rs_low=2.0, rs_high=1.5), r"rs_high must be >= rs_low = 2.0, got 1.5"),
    ],
)
def test_bad_settings_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        PolicyLossConfig(**kw)


def test_bad_inputs_are_named():
    d = _batch(9)
    m, base = d["mask"], dict(mask=d["mask"])
    with pytest.raises(ValueError, match=r"rollout_rs='token' needs rollout_logp"):
        policy_loss(d["logp"], d["old"], d["adv"], rollout_rs="token", **base)
    with pytest.raises(ValueError, match=r"not both"):
        policy_loss(d["logp"], d["old"], d["adv"], rollout_logp=d["rollout"],
                    rollout_is_weights=d["adv"], **base)  # fmt: skip
    with pytest.raises(ValueError, match=r"rollout_is_weights has shape \(3,\), expected \[7\]"):
        policy_loss(d["logp"], d["old"], d["adv"], rollout_is_weights=d["adv"][:3], **base)
    with pytest.raises(ValueError, match=r"rollout_is_weights must be a floating-point tensor"):
        policy_loss(d["logp"], d["old"], d["adv"], rollout_is_weights=m.long(), **base)
    bad = d["adv"].clone()
    bad[1] = float("nan")
    with pytest.raises(ValueError, match=r"rollout_is_weights has \d+ non-finite value"):
        policy_loss(d["logp"], d["old"], d["adv"], rollout_is_weights=bad, **base)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_rollout_at_a_rejected_token_is_named(backend):
    # a NaN sampler log-prob fails every band (rejected), yet check_finite still names it
    d = _batch(10, torch.float32)
    rollout = d["rollout"].clone()
    rollout[0, 0] = float("nan")
    d["mask"][0, 0] = True
    with pytest.raises(ValueError, match=r"rollout_logp has 1 non-finite value"):
        ours(d | {"rollout": rollout}, backend=backend, rollout_rs="token")


def test_reference_sequence_weight_is_the_product():
    # hand check of the float64 reference: one sequence, three tokens with log-ratios 0.1, -0.3,
    # 0.5: the sequence weight is exp(0.3) on every token (is_cap off), the token weights differ
    lr = torch.tensor([[0.1, -0.3, 0.5]], dtype=torch.float64)
    old = torch.full((1, 3), -1.0, dtype=torch.float64)
    logp = old.clone().requires_grad_()  # ratio 1: pg = -A
    adv = torch.tensor([1.0], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    res = policy_loss_ref(logp, old, adv, mask, rollout_logp=old - lr, is_level="sequence",
                          is_cap=None)  # fmt: skip
    assert torch.allclose(res.loss, -torch.exp(torch.tensor(0.3, dtype=torch.float64)))
