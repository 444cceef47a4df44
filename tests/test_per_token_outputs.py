"""policy_loss's per-token outputs (per_token=True): each token's loss, KL and clip flags against
the float64 reference on both backends and layouts, in fp32 and bf16; the loss they aggregate to;
the loss and gradient unchanged by asking; the pass-through of logits_policy_loss; and
liger-kernel's ``triton_grpo_loss(reduce=False)`` outputs where its settings correspond."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, assert_close_to_ref, make_batch, ours, ulp_atol

from papo_fast import policy_loss
from papo_fast.kernels.logits_policy_loss import logits_policy_loss
from papo_fast.kernels.policy_loss import PolicyLossOutput
from papo_fast.kernels.policy_loss_ref import aggregate_ref, policy_loss_terms_ref

BACKENDS = ["torch", "triton"]
EDGES = (0.8, 1.28)  # the clip edges 1 - eps_low, 1 + eps_high of the defaults (CASES keep them)
DTYPES = [torch.float32, torch.bfloat16]
# settings that reach every flag and term: the dual clip, a KL term, rollout weights (ours()
# passes rollout_logp), per-token advantages, the other loss types
CASES = {
    "ppo-dual-k3": dict(dual_clip=3.0, beta=0.1, kl="k3"),
    "ppo-k2-token-sum": dict(beta=0.05, kl="k2", agg="token-sum"),
    "cispo-abs": dict(loss_type="cispo", beta=0.1, kl="abs"),
    "sapo": dict(loss_type="sapo", agg="seq-mean-token-mean"),
    "gpg-k1": dict(loss_type="gpg", beta=0.2, kl="k1"),
    "gspo": dict(ratio_level="sequence", beta=0.1, agg="seq-mean-token-sum-norm"),
    # rollout correction: rejected tokens are 0 like masked ones; one weight per sequence
    "rs-token": dict(rollout_rs="token", rs_low=0.97, rs_high=1.03, beta=0.1, kl="k3"),
    "seq-weight-rs-geometric": dict(
        is_level="sequence",
        rollout_rs="geometric",
        rs_low=0.99,
        rs_high=1.01,
        agg="seq-mean-token-mean",
    ),  # fmt: skip
}


def padded(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A per-token output in either layout as [B, L] (packed: scattered at the valid tokens)."""
    if x.shape == mask.shape:
        return x
    out = torch.zeros(mask.shape, dtype=x.dtype)
    out[mask] = x
    return out


def reference_terms(d: dict, dtype: torch.dtype, **kw):
    """policy_loss_terms_ref on the batch's (rounded) inputs, computed in ``dtype``."""
    kw = {k: v for k, v in kw.items() if k not in ("num_tokens", "num_seqs", "max_len")}
    with torch.no_grad():
        return policy_loss_terms_ref(
            d["logp"].to(dtype), d["old"], d["adv"], d["mask"], ref_logp=d["ref"],
            rollout_logp=d["rollout"], **kw,
        )  # fmt: skip


def assert_flags_match(got: torch.Tensor, want: torch.Tensor, ratio64, edges, dtype, msg):
    """Flags equal to float64's, but at tokens whose float64 ratio is within the rounding of the
    computation (a few units of float32, the kernels' math; of ``dtype`` when coarser) of a clip
    edge, where either side of the edge is right."""
    tol = ulp_atol(torch.float32 if dtype == torch.bfloat16 else dtype, 1.0 + max(edges))
    near = torch.zeros_like(want)
    for edge in edges:
        near |= (ratio64 - edge).abs() <= tol
    bad = (got != want) & ~near
    assert not bad.any(), f"{msg}: {int(bad.sum())} flags differ, first at {bad.nonzero()[0]}"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_token_outputs_match_reference(backend, packed, dtype, case):
    kw = CASES[case]
    d = make_batch(5, 333, dtype=dtype, seed=7, per_token=case == "gpg-k1")
    res, _ = ours(d, packed=packed, backend=backend, per_token=True, **kw)
    m = d["mask"]
    pt = res.per_token
    want, same = reference_terms(d, torch.float64, **kw), reference_terms(d, dtype, **kw)
    acc = torch.float32  # the per-token outputs' dtype for fp32 / bf16 inputs
    for name, got in (("loss", pt.loss), ("kl", pt.kl)):
        assert got.dtype == acc
        assert got.shape == (d["logp"][m].shape if packed else d["logp"].shape)
        got = padded(got, m)
        assert (got[~m] == 0).all(), f"{name} is not 0 at masked positions"
        # rollout rejection: rejected tokens are 0 like masked ones (kept: the mask without them)
        w64, w_lo = (torch.where(want.kept, getattr(t, name), 0.0) for t in (want, same))
        assert_close_to_ref(got, w64, w_lo, msg=f"per-token {name}")
    for name in ("clip_low", "clip_high", "dual_clip"):
        got = padded(getattr(pt, name), m)
        assert got.dtype == torch.bool and not got[~m].any()
        assert_flags_match(got, getattr(want, name) & want.kept, want.ratio, EDGES, dtype, name)
    # the flags are what the clip metrics count
    n = res.num_tokens
    assert_close(pt.clip_low.sum() / n, res.clip_frac_low, atol=1e-6)
    assert_close(pt.clip_high.sum() / n, res.clip_frac_high, atol=1e-6)
    assert_close(pt.dual_clip.sum() / n, res.dual_clip_frac, atol=1e-6)
    assert pt.cov_select is None


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_token_loss_aggregates_to_the_loss(backend, packed, agg):
    """Aggregating the per-token losses as ``agg`` says gives the loss: float64 aggregation of
    them against ours, with the tolerance of the same aggregation in float32 (ours sums float32
    terms), over local counts and given ones."""
    d = make_batch(6, 300, dtype=torch.float32, seed=3)
    m = d["mask"]
    for counts in ({}, dict(num_tokens=2000, num_seqs=9, max_len=400)):
        res, _ = ours(d, packed=packed, backend=backend, per_token=True, agg=agg, beta=0.1,
                      **counts)  # fmt: skip
        tok = padded(res.per_token.loss, m)
        want = aggregate_ref(tok.double(), m, agg, **counts)
        same = aggregate_ref(tok.float(), m, agg, **counts)
        scale = aggregate_ref(tok.double().abs(), m, agg, **counts)
        assert_close_to_ref(res.loss, want, same, scale=scale, msg=f"aggregated {counts}")


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_token_leaves_loss_and_gradient_unchanged(backend, packed):
    """The same token pass with the extra stores: bit-identical loss, metrics and gradient; and
    the plain PolicyLossOutput unless asked for."""
    d = make_batch(4, 200, dtype=torch.float32, seed=11)
    kw = dict(beta=0.1, dual_clip=3.0, agg="seq-mean-token-mean")
    plain, g_plain = ours(d, packed=packed, backend=backend, **kw)
    asked, g_asked = ours(d, packed=packed, backend=backend, per_token=True, **kw)
    assert type(plain) is PolicyLossOutput and not hasattr(plain, "per_token")
    assert all(torch.equal(a, b) for a, b in zip(asked[:-1], plain, strict=True))
    assert torch.equal(g_asked, g_plain)


@pytest.mark.parametrize("case", ["ppo-dual-k3", "gspo"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_token_outputs_are_micro_batch_invariant(backend, case):
    """Each token's terms depend on its own sequence only: two micro-batches of whole sequences
    give the full batch's per-token outputs, bit for bit (the same formulas on the same values)."""
    d = make_batch(6, 150, dtype=torch.float32, seed=13)
    kw = dict(CASES[case], per_token=True)
    full = ours(d, backend=backend, **kw)[0].per_token
    halves = [{k: v[rows] for k, v in d.items()} for rows in (slice(0, 2), slice(2, 6))]
    parts = [ours(h, backend=backend, **kw)[0].per_token for h in halves]
    for name in ("loss", "kl", "clip_low", "clip_high", "dual_clip"):
        joined = torch.cat([getattr(p, name) for p in parts])
        assert torch.equal(joined, getattr(full, name)), f"{name} differs across micro-batches"


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_policy_loss_passes_per_token_through(backend):
    """logits_policy_loss(per_token=True) returns policy_loss's per-token outputs of its logp."""
    d = make_batch(3, 40, dtype=torch.float64, seed=5)
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(3, 40, 50, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 50, (3, 40), generator=g)
    m = d["mask"]
    res = logits_policy_loss(logits, targets, d["old"], d["adv"], mask=m, ref_logp=d["ref"],
                             beta=0.1, backend=backend, per_token=True)  # fmt: skip
    direct = policy_loss(res.logp, d["old"], d["adv"], mask=m, ref_logp=d["ref"], beta=0.1,
                         backend=backend, per_token=True)  # fmt: skip
    for a, b in zip(res.per_token[:5], direct.per_token[:5], strict=True):
        assert torch.equal(a, b)
    assert res.logp.shape == (3, 40)


# ----------------------------------------------------------------------------- liger-kernel


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_token_matches_liger_reduce_false(backend, level):
    """liger-kernel's triton_grpo_loss(reduce=False) returns (per_token_loss, per_token_kl,
    is_clipped), each times the mask: our loss (ppo, its beta·k3 with ref_logp, its
    vllm_is_ratio as our precomputed rollout weight at token level), KL and clip_low | clip_high.
    Both against the float64 formula, tolerance from its float32 computation (liger computes
    logp from the logits in float32)."""
    pytest.importorskip("liger_kernel")
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    b, length, v, temp, beta = 4, 37, 301, 0.9, 0.04
    d = make_batch(b, length, dtype=torch.float64, seed=2, lengths=[37, 1, 20, 30])
    g = torch.Generator().manual_seed(4)
    logits = 2 * torch.randn(b, length + 1, v, generator=g, dtype=torch.float64)
    targets = torch.randint(0, v, (b, length), generator=g)
    logp = (logits[:, :-1] / temp).log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    m = d["mask"]
    rollout = level == "token"
    w = torch.exp(d["old"] - d["rollout"]).clamp(max=2.0)
    tok_loss, tok_kl, clipped = triton_grpo_loss(
        logits.float().contiguous(), d["old"].float(), d["ref"].float(), targets,
        d["adv"].float(), m.int(), temperature=temp, beta=beta, eps_low=0.2, eps_high=0.28,
        inplace=False, loss_type="dapo", importance_sampling_level=level, reduce=False,
        vllm_is_ratio=w.float() if rollout else None,
    )  # fmt: skip
    kw = dict(ref_logp=d["ref"], rollout_logp=d["rollout"] if rollout else None, beta=beta)
    kw |= dict(ratio_level=level)  # ppo, k3, token-mean: the defaults
    res = policy_loss(logp.float(), d["old"].float(), d["adv"].float(), mask=m, backend=backend,
                      per_token=True, **kw)  # fmt: skip
    pt = res.per_token
    logp32 = (logits[:, :-1].float() / temp).log_softmax(-1).gather(-1, targets[..., None])
    terms = {
        dt: policy_loss_terms_ref(lp, d["old"], d["adv"], m, **kw)
        for dt, lp in ((torch.float64, logp), (torch.float32, logp32.squeeze(-1)))
    }
    for name, got, ours_t in (("loss", tok_loss, pt.loss), ("kl", tok_kl, pt.kl)):
        w64, w32 = (torch.where(m, getattr(terms[dt], name), 0.0).detach() for dt in terms)
        assert_close_to_ref(got, w64, w32, msg=f"liger {name}")
        assert_close_to_ref(ours_t, w64, w32, msg=f"ours {name}")
    ours_clip = pt.clip_low | pt.clip_high
    want = (terms[torch.float64].clip_low | terms[torch.float64].clip_high) & m
    ratio64 = terms[torch.float64].ratio
    assert_flags_match(clipped.bool(), want, ratio64, EDGES, torch.float32, "liger is_clipped")
    assert_flags_match(ours_clip, want, ratio64, EDGES, torch.float32, "ours clip")


def test_module_passes_per_token_and_the_generator_through():
    from papo_fast.kernels.policy_loss import PolicyLossModule

    d = make_batch(4, 50, dtype=torch.float32, seed=5)
    m = PolicyLossModule(loss_type="clip_cov", clip_cov_ratio=0.2, clip_cov_lb=-1e9)
    kw = dict(mask=d["mask"], per_token=True)
    a = m(d["logp"], d["old"], d["adv"], generator=torch.Generator().manual_seed(3), **kw)
    b = m(d["logp"], d["old"], d["adv"], generator=torch.Generator().manual_seed(3), **kw)
    assert a.per_token.cov_select.any() and torch.equal(
        a.per_token.cov_select, b.per_token.cov_select
    )
    assert not isinstance(m(d["logp"], d["old"], d["adv"], mask=d["mask"]), type(a))
