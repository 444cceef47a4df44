"""fused_linear_policy_loss against the materialized float64 formula: the logits, log-softmax and
gather of fused_linear_logprobs_ref, then policy_loss_ref (independent of policy_loss's code).
Edge-case and bad inputs are in test_fused_linear_policy_loss_inputs.py."""

from typing import NamedTuple

import pytest
import torch
from helpers import (
    COUNTS,
    F64_ATOL,
    assert_close,
    assert_close_to_ref,
    cu_of,
    lm_head_batch,
    pack,
    softmax_scale,
    ulp_atol,
)

import papo_fast.kernels.fused_linear_policy_loss as flpl
from papo_fast.kernels.fused_linear_logprobs import fused_linear_logprobs_ref
from papo_fast.kernels.fused_linear_policy_loss import PAPOLoss, fused_linear_policy_loss
from papo_fast.kernels.loss_config import AGGS, PolicyLossConfig
from papo_fast.kernels.policy_loss import PolicyLossOutput
from papo_fast.kernels.policy_loss_ref import aggregate_ref, policy_loss_ref, policy_loss_terms_ref

GRADS = ("grad_hidden", "grad_weight", "grad_bias")


class Reference(NamedTuple):
    """The materialized formula's results, in one dtype."""

    result: PolicyLossOutput  # the loss and its metrics, detached
    logp: torch.Tensor  # [B, L]
    entropy: torch.Tensor  # [B, L]
    grad_hidden: torch.Tensor
    grad_weight: torch.Tensor
    grad_bias: torch.Tensor
    scale: float  # the loss aggregated over |loss_t|: its rounding is relative to that
    grad_logp: torch.Tensor  # [B, L] d loss / d logp
    softmax_scale: float  # the scale of logp and entropy (helpers.softmax_scale)


def reference(d, dtype, temperature, **kw) -> Reference:
    """kw: policy_loss_ref's keywords (ref_logp=, rollout_logp=, the counts, the settings)."""
    leaves = [d[k].detach().to(dtype).requires_grad_() for k in ("hidden", "weight", "bias")]
    logp, ent = fused_linear_logprobs_ref(
        leaves[0], leaves[1], d["targets"], bias=leaves[2], temperature=temperature
    )
    logp.retain_grad()
    args = (logp, d["old"], d["adv"], d["mask"])
    res = policy_loss_ref(*args, **kw)
    res.loss.backward()
    counts = {k: kw.pop(k) for k in COUNTS if k in kw}
    inputs = {k: kw.pop(k) for k in ("ref_logp", "rollout_logp") if k in kw}
    with torch.no_grad():  # the scale: the loss aggregated over |loss_t|
        terms = policy_loss_terms_ref(*args, **inputs, **kw).loss.abs()
        agg = PolicyLossConfig.resolve(None, kw).agg
        scale = aggregate_ref(terms, d["mask"], agg, **counts).item()
    detached = PolicyLossOutput(*(x.detach() for x in res))
    sm_scale = softmax_scale(d["hidden"], d["weight"], d["bias"], temperature, logp)
    return Reference(
        detached, logp.detach(), ent.detach(), *(t.grad for t in leaves), scale, logp.grad,
        sm_scale,
    )  # fmt: skip


def loss_error_bound(want: Reference, same: Reference, mask: torch.Tensor) -> float:
    """The loss error that the same-dtype reference's log-prob errors imply to first order, with
    no cancellation: sum_t |d loss / d logp_t| * |logp_t error|. The loss is one aggregate whose
    own error may cancel by luck; half-precision logits make its terms' errors large."""
    logp_err = (same.logp.double() - want.logp).abs().masked_fill(~mask, 0)
    return (want.grad_logp.abs() * logp_err).sum().item()


class Ours(NamedTuple):
    """fused_linear_policy_loss's result and the gradients of its leaves, laid out padded."""

    result: object  # FusedPolicyLossOutput
    logp: torch.Tensor  # [B, L], 0 at padding
    entropy: torch.Tensor  # [B, L], 0 at padding
    grad_hidden: torch.Tensor
    grad_weight: torch.Tensor
    grad_bias: torch.Tensor


def ours(d, layout, temperature, backend="torch", **kw) -> Ours:
    """kw: fused_linear_policy_loss's keywords; ref_logp / rollout_logp padded [B, L]."""
    leaves = [d[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    hidden, mask = leaves[0], d["mask"]
    args = dict(targets=d["targets"], old_logp=d["old"].float(), advantages=d["adv"].float())
    args |= {k: kw.pop(k).float() for k in ("ref_logp", "rollout_logp") if k in kw}
    if layout == "packed":
        hidden = pack(hidden, mask)
        args = {k: pack(v, mask) for k, v in args.items()}
        kw["cu_seqlens"] = cu_of(mask)
    else:
        kw["mask"] = mask
    targets, old, adv = (args.pop(k) for k in ("targets", "old_logp", "advantages"))
    res = fused_linear_policy_loss(
        hidden, leaves[1], targets, old, adv, bias=leaves[2], temperature=temperature,
        return_entropy=True, backend=backend, **args, **kw,
    )  # fmt: skip
    res.loss.backward()
    logp, ent = res.logp, res.entropy
    if layout == "packed":  # back to padded (the gradients already are: packing is an indexing op)
        logp = torch.zeros(mask.shape, dtype=logp.dtype).index_put((mask,), logp)
        ent = torch.zeros(mask.shape, dtype=ent.dtype).index_put((mask,), ent)
    return Ours(res, logp, ent, *(t.grad for t in leaves))


def compare(got: Ours, want: Reference, same: Reference, mask) -> None:
    """Ours against the float64 reference, with tolerances from the same-dtype reference's own
    error (helpers.assert_close_to_ref)."""
    res = got.result
    assert_close_to_ref(res.loss, want.result.loss, same.result.loss, scale=want.scale, msg="loss")
    for name in ("logp", "entropy"):  # padding holds 0 in ours, any value in theirs
        g, w, s = (getattr(x, name).masked_fill(~mask, 0) for x in (got, want, same))
        assert_close_to_ref(g, w, s, scale=want.softmax_scale, msg=name)
    for name in ("grad_hidden", "grad_weight", "grad_bias"):
        assert_close_to_ref(getattr(got, name), getattr(want, name), getattr(same, name), msg=name)
    for name in PolicyLossOutput._fields[1:]:
        w, s = getattr(want.result, name), getattr(same.result, name)
        assert_close_to_ref(getattr(res, name), w, s, msg=name)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 token rows: several chunks of whole sequences; a sequence > 64 goes two-pass."""
    monkeypatch.setattr(flpl, "chunk_rows", lambda *a: 16)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_matches_fp64_reference(small_chunks, layout, agg, ratio_level):
    d = lm_head_batch()
    kw = dict(agg=agg, ratio_level=ratio_level)
    want = reference(d, torch.float64, 0.8, **kw)
    same = reference(d, torch.float32, 0.8, **kw)
    got = ours(d, layout, 0.8, **kw)
    compare(got, want, same, d["mask"])


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_empty_sequence_in_its_own_chunk(small_chunks, agg):
    """Row 1 has no valid token and fills a chunk alone: it adds nothing to the loss, the counts
    or the ratio min/max (policy_loss reports 0 for that chunk's min and max)."""
    d = lm_head_batch(lengths=[11, 0, 4, 9, 7, 9])
    want = reference(d, torch.float64, 1.0, agg=agg)
    same = reference(d, torch.float32, 1.0, agg=agg)
    got = ours(d, "padded", 1.0, agg=agg)
    compare(got, want, same, d["mask"])


def test_padded_without_padding(small_chunks):
    """Every token valid: the padded layout is used in place (views, no gathered copy)."""
    d = lm_head_batch(lengths=[11] * 6)
    want = reference(d, torch.float64, 1.0, agg="seq-mean-token-mean")
    same = reference(d, torch.float32, 1.0, agg="seq-mean-token-mean")
    got = ours(d, "padded", 1.0, agg="seq-mean-token-mean")
    compare(got, want, same, d["mask"])


CONFIGS = {
    "dual_clip": dict(dual_clip=3.0),
    "kl_k1": dict(beta=0.1, kl="k1"),
    "kl_k2": dict(beta=0.1, kl="k2"),
    "kl_k3": dict(beta=0.04, kl="k3", dual_clip=2.0),
    "rollout_is": dict(is_cap=1.05),
    "per_token_adv": dict(),
    "cispo_kl_abs_corrected": dict(loss_type="cispo", beta=0.1, kl="abs", kl_ratio_correction=True),
    "sapo_kl_k3plus": dict(loss_type="sapo", beta=0.1, kl="k3+", agg="seq-mean-token-mean"),
    "gpg_token_sum": dict(loss_type="gpg", agg="token-sum", is_cap=1.5),
}


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_options_match_fp64_reference(small_chunks, layout, name):
    d = lm_head_batch()
    kw = dict(CONFIGS[name])
    ref_kw, our_kw = dict(kw), dict(kw)
    if "beta" in kw:
        ref_kw["ref_logp"] = our_kw["ref_logp"] = d["ref"]
    if "is_cap" in kw:
        ref_kw["rollout_logp"] = our_kw["rollout_logp"] = d["rollout"]
    if name == "per_token_adv":
        d["adv"] = torch.randn(d["mask"].shape, dtype=torch.float64)
    want = reference(d, torch.float64, 1.0, **ref_kw)
    same = reference(d, torch.float32, 1.0, **ref_kw)
    got = ours(d, layout, 1.0, **our_kw)
    compare(got, want, same, d["mask"])


def test_long_sequence_takes_the_two_pass_path(small_chunks, monkeypatch):
    """A 70-token sequence > 4 x 16 rows: logp first, then a gradient pass (4 products, not 3)."""
    calls = []
    real = flpl.FusedLinearLogprobsFunction.apply
    monkeypatch.setattr(flpl.FusedLinearLogprobsFunction, "apply",
                        lambda *a: calls.append(1) or real(*a))  # fmt: skip
    d = lm_head_batch(b=3, length=70, lengths=[70, 5, 33])
    want = reference(d, torch.float64, 1.0)
    same = reference(d, torch.float32, 1.0)
    got = ours(d, "packed", 1.0)
    assert calls == [1]
    compare(got, want, same, d["mask"])


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_single_pass_does_three_products(small_chunks, monkeypatch, ratio_level):
    """Forward + backward compute each chunk's logits once: the three-product floor."""
    n = []
    real = flpl.chunk_logits
    monkeypatch.setattr(flpl, "chunk_logits", lambda *a: n.append(1) or real(*a))
    d = lm_head_batch()  # valid lengths 11, 1, 4 | 9, 7 | 9: three chunks of at most 16 tokens
    ours(d, "padded", 1.0, ratio_level=ratio_level)
    assert len(n) == 3


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp32_backends_match_reference(small_chunks, backend):
    # Each backend against float64, never against each other with a fixed constant.
    d = lm_head_batch(b=3, length=9, v=150, lengths=[9, 2, 6])
    kw = dict(beta=0.04, agg="seq-mean-token-mean")
    want = reference(d, torch.float64, 0.7, ref_logp=d["ref"], **kw)
    same = reference(d, torch.float32, 0.7, ref_logp=d["ref"], **kw)
    got = ours(d, "packed", 0.7, backend=backend, ref_logp=d["ref"], **kw)
    compare(got, want, same, d["mask"])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_within_the_reference_bf16_error(small_chunks, backend):
    d = lm_head_batch(dtype=torch.bfloat16, v=301)
    want = reference(d, torch.float64, 1.0)
    same = reference(d, torch.bfloat16, 1.0)
    got = ours(d, "padded", 1.0, backend=backend)
    assert all(getattr(got, name).dtype == torch.bfloat16 for name in GRADS)
    bound = loss_error_bound(want, same, d["mask"])
    loss, want_loss, same_loss = got.result.loss, want.result.loss, same.result.loss
    assert_close_to_ref(loss, want_loss, same_loss, scale=want.scale, ref_err=bound, msg="loss")
    g, w, s = (x.logp.masked_fill(~d["mask"], 0) for x in (got, want, same))
    assert_close_to_ref(g, w, s, scale=want.softmax_scale, msg="logp")
    for name in GRADS:
        assert_close_to_ref(getattr(got, name), getattr(want, name), getattr(same, name), msg=name)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_micro_batches_sum_to_the_full_batch(small_chunks, agg, ratio_level):
    """Two micro-batches with the global counts: the summed loss and gradients are the batch's."""
    d = lm_head_batch(dtype=torch.float64)
    lens = d["mask"].sum(1)
    counts = dict(num_tokens=lens.sum(), num_seqs=6, max_len=lens.max())

    def run(rows, hidden, weight):
        return fused_linear_policy_loss(
            hidden[rows], weight, d["targets"][rows], d["old"][rows], d["adv"][rows],
            mask=d["mask"][rows], agg=agg, ratio_level=ratio_level, **counts,
        ).loss  # fmt: skip

    h = d["hidden"].clone().requires_grad_()
    w = d["weight"].clone().requires_grad_()
    full = run(slice(0, 6), h, w)
    gh, gw = torch.autograd.grad(full, (h, w))
    split = run(slice(0, 2), h, w) + run(slice(2, 6), h, w)
    sh, sw = torch.autograd.grad(split, (h, w))
    assert_close(split, full, atol=F64_ATOL)  # float64 throughout
    assert_close(sh, gh, atol=F64_ATOL)
    assert_close(sw, gw, atol=F64_ATOL)


def test_int32_targets_and_cu_seqlens():
    d = lm_head_batch()
    want = reference(d, torch.float64, 1.0)
    same = reference(d, torch.float32, 1.0)
    lens = d["mask"].sum(1)
    cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)]).int()
    m = d["mask"]
    res = fused_linear_policy_loss(d["hidden"][m], d["weight"], d["targets"][m].int(),
                                   d["old"][m].float(), d["adv"].float(), bias=d["bias"],
                                   cu_seqlens=cu)  # fmt: skip
    assert_close_to_ref(res.loss, want.result.loss, same.result.loss, scale=want.scale)


def test_module_no_grad_and_frozen_head():
    d = lm_head_batch()
    loss_fn = PAPOLoss(temperature=0.9, agg="seq-mean-token-mean")
    assert "seq-mean-token-mean" in repr(loss_fn)
    args = (d["targets"], d["old"].float(), d["adv"].float())
    with torch.no_grad():
        out = loss_fn(d["hidden"].requires_grad_(), d["weight"], *args, mask=d["mask"])
    assert out.loss.grad_fn is None and out.entropy is None
    out = loss_fn(d["hidden"], d["weight"], *args, bias=d["bias"], mask=d["mask"])  # frozen head
    out.loss.backward()
    want = reference(d, torch.float64, 0.9, agg="seq-mean-token-mean")
    same = reference(d, torch.float32, 0.9, agg="seq-mean-token-mean")
    assert d["weight"].grad is None
    assert_close_to_ref(d["hidden"].grad, want.grad_hidden, same.grad_hidden)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_per_token_advantages_in_a_chunk_with_as_many_tokens_as_sequences(small_chunks, layout):
    # Valid lengths [2, 0, 15, 15] and chunks of 16 rows: the first chunk holds sequences 0 and 1,
    # 2 tokens for 2 sequences. Its per-token advantages stay per token (T = 32 != B = 4 overall).
    d = lm_head_batch(b=4, length=15, lengths=[2, 0, 15, 15])
    d["adv"] = torch.randn(d["mask"].shape, dtype=torch.float64)
    want = reference(d, torch.float64, 1.0)
    same = reference(d, torch.float32, 1.0)
    got = ours(d, layout, 1.0)
    compare(got, want, same, d["mask"])


# liger-kernel's loss_type -> our agg (its "grpo" divides by B, its "dr_grpo" by B x max length)
LIGER_AGG = {
    "dapo": "token-mean",
    "bnpo": "token-mean",
    "grpo": "seq-mean-token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
}


@pytest.mark.parametrize("loss_type", list(LIGER_AGG))
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_agrees_with_liger_kernel(loss_type, beta):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    d = lm_head_batch(dtype=torch.float32)
    B, L = d["mask"].shape
    old, ref, adv = d["old"].float(), d["ref"].float(), d["adv"].float()
    liger = LigerFusedLinearGRPOLoss(
        beta=beta, compiled=False, use_ref_model=beta > 0, epsilon_low=0.2, epsilon_high=0.28,
        loss_type=loss_type, max_completion_length=L, temperature=0.9,
    )  # fmt: skip
    h1, w1, b1 = (d[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    loss_l, metrics_l = liger(h1, w1, d["targets"], d["mask"].long(), adv, bias=b1,
                              ref_per_token_logps=ref if beta else None,
                              old_per_token_logps=old)  # fmt: skip
    loss_l.backward()

    h2, w2, b2 = (d[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    res = fused_linear_policy_loss(
        h2, w2, d["targets"], old, adv, bias=b2, temperature=0.9, mask=d["mask"],
        ref_logp=ref, beta=beta, kl="k3", agg=LIGER_AGG[loss_type], num_seqs=B, max_len=L,
    )  # fmt: skip
    res.loss.backward()

    # Both against the float64 formula with the same-dtype tolerance, not against each other.
    kw = dict(
        agg=LIGER_AGG[loss_type], num_seqs=B, max_len=L, beta=beta, ref_logp=d["ref"], kl="k3"
    )
    want = reference(d, torch.float64, 0.9, **kw)
    same = reference(d, torch.float32, 0.9, **kw)
    for who, loss, leaves in (("ours", res.loss, (h2, w2, b2)), ("liger", loss_l, (h1, w1, b1))):
        assert_close_to_ref(loss, want.result.loss, same.result.loss, scale=want.scale, msg=who)
        for leaf, name in zip(leaves, GRADS, strict=True):
            w, s = getattr(want, name), getattr(same, name)
            assert_close_to_ref(leaf.grad, w, s, msg=f"{who} {name}")
    # share of tokens clipped where it binds (low with A < 0, high with A > 0): the same counts,
    # each divided once in fp32 (a fraction <= 1, so one rounding each is 2 units of eps at most)
    clip_l = metrics_l[-1]
    clip = res.clip_frac_low + res.clip_frac_high
    assert_close(clip, clip_l, atol=ulp_atol(torch.float32, 1.0, ulps=2), msg="clip fraction")
    if beta:
        for who, kl in (("ours", res.kl), ("liger", metrics_l[0])):
            assert_close_to_ref(kl, want.result.kl, same.result.kl, msg=f"{who} kl")


def test_grad_output_scales_and_a_second_backward_raises():
    """The stored gradients are scaled in place by the backward (no [V, H] copy at the peak)."""
    d = lm_head_batch()
    h = d["hidden"].clone().requires_grad_()
    res = fused_linear_policy_loss(h, d["weight"], d["targets"], d["old"].float(),
                                   d["adv"].float(), bias=d["bias"], mask=d["mask"])  # fmt: skip
    (2.5 * res.loss).backward(retain_graph=True)
    want, same = (2.5 * reference(d, t, 1.0).grad_hidden for t in (torch.float64, torch.float32))
    assert_close_to_ref(h.grad, want, same)
    with pytest.raises(RuntimeError, match="one backward"):
        res.loss.backward()


@pytest.mark.cuda
def test_cuda_bf16_matches_reference():
    """The Triton path on a GPU, bf16, a vocabulary spanning several blocks with a ragged tail;
    the fp32-output products must be available (no fallback warning)."""
    import warnings

    d = lm_head_batch(
        b=4, length=64, h=256, v=32003, dtype=torch.bfloat16, lengths=[64, 10, 33, 50]
    )
    want = reference(d, torch.float64, 1.0)
    same = reference(d, torch.bfloat16, 1.0)
    cuda = {k: v.cuda() for k, v in d.items()}
    leaves = [cuda[k].requires_grad_() for k in ("hidden", "weight", "bias")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        old, adv = cuda["old"].float(), cuda["adv"].float()
        res = fused_linear_policy_loss(leaves[0], leaves[1], cuda["targets"], old, adv,
                                       bias=leaves[2], mask=cuda["mask"])  # fmt: skip
        res.loss.backward()
    bound = loss_error_bound(want, same, d["mask"])
    loss = res.loss.cpu()
    loss_args = (want.result.loss, same.result.loss)
    assert_close_to_ref(loss, *loss_args, scale=want.scale, ref_err=bound, msg="loss")
    for leaf, name in zip(leaves, GRADS, strict=True):
        assert_close_to_ref(leaf.grad.cpu(), getattr(want, name), getattr(same, name), msg=name)
