"""fused_linear_policy_loss against a float64 materialized reference: logits, log_softmax, gather,
then the GRPO loss written out eagerly below (DESIGN §2), independent of policy_loss's code."""

from typing import NamedTuple

import pytest
import torch
from helpers import F64_ATOL, assert_close, assert_close_to_ref, softmax_scale, ulp_atol

import papo_fast.kernels.fused_linear_policy_loss as flpl
from papo_fast.kernels.fused_linear_policy_loss import PAPOLoss, fused_linear_policy_loss

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def eager_loss(logp, old, adv, m, *, eps_low=0.2, eps_high=0.28, dual_clip=None, beta=0.0,
               ref=None, kl="k3", agg="token-mean", ratio_level="token", rollout=None,
               is_cap=2.0, num_tokens=None, num_seqs=None, max_len=None,
               magnitude=False):  # fmt: skip
    """Padded layout: logp/old/ref/rollout/m [B, L], adv [B] or [B, L]. Returns (loss, metrics).
    ``magnitude``: aggregate |loss_t| instead (the scale of the loss's rounding error)."""
    m = m.to(logp.dtype)
    A = adv[:, None] if adv.dim() == 1 else adv
    log_ratio = logp - old
    if ratio_level == "sequence":  # GSPO, verl's form: value exp(mean), d/d logp_t = ratio
        seq = (log_ratio * m).sum(1) / m.sum(1).clamp(min=1)
        log_ratio = logp - logp.detach() + seq.detach()[:, None]
    ratio = log_ratio.exp()
    pg = torch.maximum(-ratio * A, -ratio.clamp(1 - eps_low, 1 + eps_high) * A)
    dual = torch.zeros_like(pg, dtype=torch.bool)
    if dual_clip is not None:
        dual = (A < 0) & (pg > -dual_clip * A)
        pg = torch.where(A < 0, torch.minimum(pg, -dual_clip * A), pg)
    if rollout is not None:
        w = (old - rollout).exp()
        pg = pg * (w if is_cap is None else w.clamp(max=is_cap))
    delta = logp - ref if ref is not None else torch.zeros_like(logp)
    kl_t = {"k1": delta, "k2": delta**2 / 2, "k3": (-delta).exp() + delta - 1}[kl]
    loss_t = pg + beta * kl_t if beta else pg
    loss_t = loss_t.abs() if magnitude else loss_t
    lens = m.sum(1)
    n_tok = lens.sum() if num_tokens is None else num_tokens
    n_seq = (lens > 0).sum() if num_seqs is None else num_seqs
    l_max = lens.max() if max_len is None else max_len
    total = (loss_t * m).sum()
    loss = {
        "token-mean": total / n_tok,
        "seq-mean-token-mean": ((loss_t * m).sum(1) / lens.clamp(min=1)).sum() / n_seq,
        "seq-mean-token-sum": total / n_seq,
        "seq-mean-token-sum-norm": total / (n_seq * l_max),
    }[agg]
    r, n = ratio.detach(), m.sum()
    valid = m > 0
    metrics = {
        "clip_frac_low": ((r < 1 - eps_low) & (A < 0) & valid).sum() / n,
        "clip_frac_high": ((r > 1 + eps_high) & (A > 0) & valid).sum() / n,
        "dual_clip_frac": (dual & valid).sum() / n,
        "kl": (kl_t.detach() * m).sum() / n if beta else torch.zeros(()),
        "ratio_mean": (r * m).sum() / n,
        "ratio_min": r[valid].min(),
        "ratio_max": r[valid].max(),
        "num_tokens": n,
    }
    return loss, metrics


def make_batch(B=6, L=11, H=12, V=97, dtype=torch.float32, lengths=None):
    """Padded [B, L] data with ragged valid lengths, logp values near the current policy's."""
    lengths = lengths or [L, 1, 4, L - 2, 7, 9][:B]
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    hidden = torch.randn(B, L, H, dtype=dtype)
    weight = (torch.randn(V, H) / H**0.5).to(dtype)
    bias = (0.5 * torch.randn(V)).to(dtype)
    targets = torch.randint(0, V, (B, L))
    with torch.no_grad():
        logp = (hidden.double() @ weight.double().T + bias.double()).log_softmax(-1)
        logp = logp.gather(-1, targets[..., None]).squeeze(-1)
    old = logp + 0.3 * torch.randn(B, L, dtype=torch.float64)  # ratios spread across the clip
    ref = logp + 0.2 * torch.randn(B, L, dtype=torch.float64)
    rollout = old + 0.1 * torch.randn(B, L, dtype=torch.float64)
    adv = torch.randn(B, dtype=torch.float64)
    return dict(hidden=hidden, weight=weight, bias=bias, targets=targets, mask=mask, old=old,
                ref=ref, rollout=rollout, adv=adv)  # fmt: skip


def materialized(hidden, weight, bias, targets, temperature):
    z = hidden @ weight.T + bias
    z = z.float() if z.dtype in (torch.bfloat16, torch.float16) else z
    logsm = (z / temperature).log_softmax(-1)
    return logsm.gather(-1, targets[..., None]).squeeze(-1), -(logsm.exp() * logsm).sum(-1)


def pack(x, mask):
    """Padded [B, L, ...] -> packed [T, ...] of the valid tokens."""
    return x[mask]


class Reference(NamedTuple):
    """The eager formula's results (indexable like ours: loss, metrics, logp, entropy, grads)."""

    loss: torch.Tensor
    metrics: dict
    logp: torch.Tensor  # [B, L]
    entropy: torch.Tensor  # [B, L]
    grad_hidden: torch.Tensor
    grad_weight: torch.Tensor
    grad_bias: torch.Tensor
    scale: float  # the loss aggregated over |loss_t|: its rounding is relative to that
    grad_logp: torch.Tensor  # [B, L] d loss / d logp
    softmax_scale: float  # the scale of logp and entropy (helpers.softmax_scale)


def reference(d, dtype, temperature, **kw) -> Reference:
    leaves = [d[k].detach().to(dtype).requires_grad_() for k in ("hidden", "weight", "bias")]
    logp, ent = materialized(*leaves, d["targets"], temperature)
    logp.retain_grad()
    kw = {k: v.to(logp.dtype) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    args = (d["old"].to(logp.dtype), d["adv"].to(logp.dtype), d["mask"])
    loss, metrics = eager_loss(logp, *args, **kw)
    loss.backward()
    with torch.no_grad():
        scale = eager_loss(logp, *args, magnitude=True, **kw)[0].item()
    grads = (t.grad for t in leaves)
    sm_scale = softmax_scale(d["hidden"], d["weight"], d["bias"], temperature, logp)
    return Reference(
        loss.detach(), metrics, logp.detach(), ent.detach(), *grads, scale, logp.grad, sm_scale
    )


def loss_error_bound(want: Reference, same: Reference, mask: torch.Tensor) -> float:
    """The loss error that the same-dtype reference's log-prob errors imply to first order, with
    no cancellation: sum_t |d loss / d logp_t| * |logp_t error|. The loss is one aggregate whose
    own error may cancel by luck; half-precision logits make its terms' errors large."""
    logp_err = (same.logp.double() - want.logp).abs().masked_fill(~mask, 0)
    return (want.grad_logp.abs() * logp_err).sum().item()


def ours(d, layout, temperature, backend="torch", **kw):
    leaves = [d[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    hidden, mask = leaves[0], d["mask"]
    args = dict(targets=d["targets"], old_logp=d["old"].float(), advantages=d["adv"].float())
    extra = {k: kw.pop(k).float() for k in ("ref_logp", "rollout_logp") if k in kw}
    if layout == "packed":
        lens = mask.sum(1)
        cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)])
        hidden = pack(hidden, mask)
        args = {k: pack(v, mask) if v.dim() == 2 else v for k, v in args.items()}
        extra = {k: pack(v, mask) for k, v in extra.items()}
        kw["cu_seqlens"] = cu
    else:
        kw["mask"] = mask
    res = fused_linear_policy_loss(hidden, leaves[1], args["targets"], args["old_logp"],
                                   args["advantages"], bias=leaves[2], temperature=temperature,
                                   return_entropy=True, backend=backend, **extra, **kw)  # fmt: skip
    res.loss.backward()
    grad_h = leaves[0].grad
    logp, ent = res.logp, res.entropy
    if layout == "packed":  # back to padded (grad_h already is: packing is an indexing op)
        logp = torch.zeros(mask.shape, dtype=logp.dtype).index_put((mask,), logp)
        ent = torch.zeros(mask.shape, dtype=ent.dtype).index_put((mask,), ent)
    return res, logp, ent, grad_h, leaves[1].grad, leaves[2].grad


def compare(res, got, want, same, mask):
    """got: ours (res, logp, ent, gh, gw, gb); want/same: reference() in float64 / test dtype.
    Tolerances: helpers.assert_close_to_ref, from the same-dtype reference's own error."""
    assert_close_to_ref(res.loss, want[0], same[0], scale=want.scale, msg="loss")
    for i, name in [(1, "logp"), (2, "entropy")]:  # padding holds 0 in ours, any value in theirs
        g, w, s = (x.masked_fill(~mask, 0) for x in (got[i], want[i + 1], same[i + 1]))
        assert_close_to_ref(g, w, s, scale=want.softmax_scale, msg=name)
    for i, name in [(3, "grad_hidden"), (4, "grad_weight"), (5, "grad_bias")]:
        assert_close_to_ref(got[i], want[i + 1], same[i + 1], msg=name)
    for name, value in want[1].items():
        assert_close_to_ref(getattr(res, name), value, same[1][name], msg=name)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 token rows: several chunks of whole sequences; a sequence > 64 goes two-pass."""
    monkeypatch.setattr(flpl, "chunk_rows", lambda *a: 16)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_matches_fp64_reference(small_chunks, layout, agg, ratio_level):
    d = make_batch()
    kw = dict(agg=agg, ratio_level=ratio_level)
    want = reference(d, torch.float64, 0.8, **kw)
    same = reference(d, torch.float32, 0.8, **kw)
    res, *got = ours(d, layout, 0.8, **kw)
    compare(res, (res, *got), want, same, d["mask"])


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_empty_sequence_in_its_own_chunk(small_chunks, agg):
    """Row 1 has no valid token and fills a chunk alone: it adds nothing to the loss, the counts
    or the ratio min/max (policy_loss reports 0 for that chunk's min and max)."""
    d = make_batch(lengths=[11, 0, 4, 9, 7, 9])
    want = reference(d, torch.float64, 1.0, agg=agg)
    same = reference(d, torch.float32, 1.0, agg=agg)
    res, *got = ours(d, "padded", 1.0, agg=agg)
    compare(res, (res, *got), want, same, d["mask"])


def test_padded_without_padding(small_chunks):
    """Every token valid: the padded layout is used in place (views, no gathered copy)."""
    d = make_batch(lengths=[11] * 6)
    want = reference(d, torch.float64, 1.0, agg="seq-mean-token-mean")
    same = reference(d, torch.float32, 1.0, agg="seq-mean-token-mean")
    res, *got = ours(d, "padded", 1.0, agg="seq-mean-token-mean")
    compare(res, (res, *got), want, same, d["mask"])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_valid_token_gives_zero_not_nan(backend):
    d = make_batch()
    h = d["hidden"].requires_grad_()
    empty = torch.zeros_like(d["mask"])
    res = fused_linear_policy_loss(h, d["weight"], d["targets"], d["old"].float(),
                                   d["adv"].float(), mask=empty, backend=backend)  # fmt: skip
    res.loss.backward()
    assert res.loss.item() == 0.0 and res.num_tokens.item() == 0 and res.ratio_min.item() == 0.0
    assert h.grad.abs().sum().item() == 0.0 and res.logp.abs().sum().item() == 0.0


CONFIGS = {
    "dual_clip": dict(dual_clip=3.0),
    "kl_k1": dict(beta=0.1, kl="k1"),
    "kl_k2": dict(beta=0.1, kl="k2"),
    "kl_k3": dict(beta=0.04, kl="k3", dual_clip=2.0),
    "rollout_is": dict(is_cap=1.05),
    "per_token_adv": dict(),
}


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_options_match_fp64_reference(small_chunks, layout, name):
    d = make_batch()
    kw = dict(CONFIGS[name])
    ref_kw, our_kw = dict(kw), dict(kw)
    if "beta" in kw:
        ref_kw["ref"], our_kw["ref_logp"] = d["ref"], d["ref"]
    if "is_cap" in kw:
        ref_kw["rollout"], our_kw["rollout_logp"] = d["rollout"], d["rollout"]
    if name == "per_token_adv":
        d["adv"] = torch.randn(d["mask"].shape, dtype=torch.float64)
    want = reference(d, torch.float64, 1.0, **ref_kw)
    same = reference(d, torch.float32, 1.0, **ref_kw)
    res, *got = ours(d, layout, 1.0, **our_kw)
    compare(res, (res, *got), want, same, d["mask"])


def test_long_sequence_takes_the_two_pass_path(small_chunks, monkeypatch):
    """A 70-token sequence > 4 x 16 rows: logp first, then a gradient pass (4 products, not 3)."""
    calls = []
    real = flpl.FusedLinearLogprobsFunction.apply
    monkeypatch.setattr(flpl.FusedLinearLogprobsFunction, "apply",
                        lambda *a: calls.append(1) or real(*a))  # fmt: skip
    d = make_batch(B=3, L=70, lengths=[70, 5, 33])
    want = reference(d, torch.float64, 1.0)
    same = reference(d, torch.float32, 1.0)
    res, *got = ours(d, "packed", 1.0)
    assert calls == [1]
    compare(res, (res, *got), want, same, d["mask"])


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_single_pass_does_three_products(small_chunks, monkeypatch, ratio_level):
    """Forward + backward compute each chunk's logits once: the three-product floor."""
    n = []
    real = flpl.chunk_logits
    monkeypatch.setattr(flpl, "chunk_logits", lambda *a: n.append(1) or real(*a))
    d = make_batch()  # valid lengths 11, 1, 4 | 9, 7 | 9: three chunks of at most 16 tokens
    ours(d, "padded", 1.0, ratio_level=ratio_level)
    assert len(n) == 3


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp32_backends_match_reference(small_chunks, backend):
    # Each backend against float64, never against each other with a fixed constant.
    d = make_batch(B=3, L=9, V=150, lengths=[9, 2, 6])
    kw = dict(beta=0.04, agg="seq-mean-token-mean")
    want = reference(d, torch.float64, 0.7, ref=d["ref"], **kw)
    same = reference(d, torch.float32, 0.7, ref=d["ref"], **kw)
    res, *got = ours(d, "packed", 0.7, backend=backend, ref_logp=d["ref"], **kw)
    compare(res, (res, *got), want, same, d["mask"])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_within_the_reference_bf16_error(small_chunks, backend):
    d = make_batch(dtype=torch.bfloat16, V=301)
    want = reference(d, torch.float64, 1.0)
    same = reference(d, torch.bfloat16, 1.0)
    res, *got = ours(d, "padded", 1.0, backend=backend)
    for i, name in [(3, "grad_hidden"), (4, "grad_weight"), (5, "grad_bias")]:
        assert got[i - 1].dtype == torch.bfloat16, name
    bound = loss_error_bound(want, same, d["mask"])
    assert_close_to_ref(res.loss, want[0], same[0], scale=want.scale, ref_err=bound, msg="loss")
    g, w, s = (x.masked_fill(~d["mask"], 0) for x in (got[0], want[2], same[2]))
    assert_close_to_ref(g, w, s, scale=want.softmax_scale, msg="logp")
    for i, name in [(2, "grad_hidden"), (3, "grad_weight"), (4, "grad_bias")]:
        assert_close_to_ref(got[i], want[i + 2], same[i + 2], msg=name)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_micro_batches_sum_to_the_full_batch(small_chunks, agg, ratio_level):
    """Two micro-batches with the global counts: the summed loss and gradients are the batch's."""
    d = make_batch(dtype=torch.float64)
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
    d = make_batch()
    want = reference(d, torch.float64, 1.0)
    same = reference(d, torch.float32, 1.0)
    lens = d["mask"].sum(1)
    cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)]).int()
    m = d["mask"]
    res = fused_linear_policy_loss(d["hidden"][m], d["weight"], d["targets"][m].int(),
                                   d["old"][m].float(), d["adv"].float(), bias=d["bias"],
                                   cu_seqlens=cu)  # fmt: skip
    assert_close_to_ref(res.loss, want[0], same[0], scale=want.scale)


def test_module_no_grad_and_frozen_head():
    d = make_batch()
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
    assert_close_to_ref(d["hidden"].grad, want[4], same[4])


def test_bad_inputs_raise():
    d = make_batch()
    h, w, t, old, adv, mask = (d[k] for k in ("hidden", "weight", "targets", "old", "adv", "mask"))
    old, adv = old.float(), adv.float()
    f = fused_linear_policy_loss
    with pytest.raises(ValueError, match="weight"):
        f(h, w[:, :5], t, old, adv, mask=mask)
    with pytest.raises(ValueError, match="hidden must be"):
        f(h, w, t, old, adv, cu_seqlens=torch.tensor([0, 66]))
    with pytest.raises(ValueError, match="temperature"):
        f(h, w, t, old, adv, mask=mask, temperature=0.0)
    with pytest.raises(ValueError, match=r"\[0, V=97\)"):
        f(h, w, t + 97, old, adv, mask=mask)
    with pytest.raises(ValueError, match="agg"):
        f(h, w, t, old, adv, mask=mask, agg="mean")
    with pytest.raises(ValueError, match="advantages"):
        f(h, w, t, old, adv[:4], mask=mask)
    with pytest.raises(ValueError, match="mask"):
        f(h, w, t, old, adv)  # neither mask nor cu_seqlens
    with pytest.raises(ValueError, match="one device"):
        f(h, w.to("meta"), t, old, adv, mask=mask)
    with pytest.raises(ValueError, match="old_logp"):
        f(h, w, t, old.masked_fill(mask.bool() & (t == t[0, 0]), float("nan")), adv, mask=mask)


def test_padding_targets_may_be_ignore_ids():
    d = make_batch()
    h, w, t, old, adv, mask = (d[k] for k in ("hidden", "weight", "targets", "old", "adv", "mask"))
    res = fused_linear_policy_loss(h, w, t, old.float(), adv.float(), mask=mask)
    ignored = t.masked_fill(~mask, -100)  # Hugging Face's label padding
    res_ignored = fused_linear_policy_loss(h, w, ignored, old.float(), adv.float(), mask=mask)
    assert_close(res_ignored.loss, res.loss, atol=0)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_non_finite_hidden_is_named_once(small_chunks, layout):
    d = make_batch()
    h, w, t, old, adv, mask = (d[k] for k in ("hidden", "weight", "targets", "old", "adv", "mask"))
    h = h.clone()
    h[0, 0, 3] = float("nan")  # a valid token: its logits, and so its log-prob, are NaN
    if layout == "padded":
        args, kw = (h, w, t, old.float(), adv.float()), {"mask": mask}
    else:
        cu = torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(1).cumsum(0)])
        m = mask.bool()
        args, kw = (h[m], w, t[m], old.float()[m], adv.float()), {"cu_seqlens": cu}
    with pytest.raises(ValueError, match="non-finite log-probs computed from hidden"):
        fused_linear_policy_loss(*args, **kw)
    res = fused_linear_policy_loss(*args, **kw, check_finite=False)
    assert res.num_nonfinite.item() >= 1


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

    d = make_batch(dtype=torch.float32)
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
    kw = dict(agg=LIGER_AGG[loss_type], num_seqs=B, max_len=L, beta=beta, ref=d["ref"], kl="k3")
    want = reference(d, torch.float64, 0.9, **kw)
    same = reference(d, torch.float32, 0.9, **kw)
    for who, loss, leaves in (("ours", res.loss, (h2, w2, b2)), ("liger", loss_l, (h1, w1, b1))):
        assert_close_to_ref(loss, want[0], same[0], scale=want.scale, msg=f"{who} loss")
        for leaf, w, s, name in zip(leaves, want[4:7], same[4:7], ["gh", "gw", "gb"], strict=True):
            assert_close_to_ref(leaf.grad, w, s, msg=f"{who} {name}")
    # share of tokens clipped where it binds (low with A < 0, high with A > 0): the same counts,
    # each divided once in fp32 (a fraction <= 1, so one rounding each is 2 units of eps at most)
    clip_l = metrics_l[-1]
    clip = res.clip_frac_low + res.clip_frac_high
    assert_close(clip, clip_l, atol=ulp_atol(torch.float32, 1.0, ulps=2), msg="clip fraction")
    if beta:
        for who, kl in (("ours", res.kl), ("liger", metrics_l[0])):
            assert_close_to_ref(kl, want[1]["kl"], same[1]["kl"], msg=f"{who} kl")


def test_grad_output_scales_and_a_second_backward_raises():
    """The stored gradients are scaled in place by the backward (no [V, H] copy at the peak)."""
    d = make_batch()
    h = d["hidden"].clone().requires_grad_()
    res = fused_linear_policy_loss(h, d["weight"], d["targets"], d["old"].float(),
                                   d["adv"].float(), bias=d["bias"], mask=d["mask"])  # fmt: skip
    (2.5 * res.loss).backward(retain_graph=True)
    want, same = (2.5 * reference(d, dtype, 1.0)[4] for dtype in (torch.float64, torch.float32))
    assert_close_to_ref(h.grad, want, same)
    with pytest.raises(RuntimeError, match="one backward"):
        res.loss.backward()


@pytest.mark.cuda
def test_cuda_bf16_matches_reference():
    """The Triton path on a GPU, bf16, a vocabulary spanning several blocks with a ragged tail;
    the fp32-output products must be available (no fallback warning)."""
    import warnings

    d = make_batch(B=4, L=64, H=256, V=32003, dtype=torch.bfloat16, lengths=[64, 10, 33, 50])
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
    assert_close_to_ref(loss, want[0], same[0], scale=want.scale, ref_err=bound, msg="loss")
    for leaf, w, s, name in zip(leaves, want[4:7], same[4:7], ["gh", "gw", "gb"], strict=True):
        assert_close_to_ref(leaf.grad.cpu(), w, s, msg=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("entry", ["function", "module"])
def test_padded_per_token_advantages_when_valid_tokens_equal_b(backend, entry):
    # B = 2, L = 3, valid tokens [[1, 1, 0], [0, 0, 0]]: 2 valid tokens, as many as sequences.
    # Advantages [B, L] are per token whatever the counts: on-policy (ratio 1) loss_t = -A_t, so
    # token-mean = -(1 + -3) / 2 = +1.0 (read per sequence, A = 1 on both tokens, it is -1.0).
    # d loss / d logp_t = -A_t / 2 = [-0.5, 1.5].
    d = make_batch(B=2, L=3, lengths=[2, 0])
    adv = torch.tensor([[1.0, -3.0, 0.0], [0.0, 0.0, 0.0]])
    h = d["hidden"].clone().requires_grad_()
    args = (h, d["weight"], d["targets"], None, adv)
    if entry == "module":
        res = PAPOLoss(backend=backend)(*args, mask=d["mask"])
    else:
        res = fused_linear_policy_loss(*args, mask=d["mask"], backend=backend)
    res.loss.backward()
    assert_close(res.loss, torch.tensor(1.0), atol=ulp_atol(torch.float32, 3.0))
    # the gradient through the log-probs: d logp_t / d h_t of the float64 formula, times -A_t / 2
    h64 = d["hidden"].double().requires_grad_()
    logp, _ = materialized(h64, d["weight"].double(), torch.zeros(()), d["targets"], 1.0)
    (logp * torch.tensor([[-0.5, 1.5, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)).sum().backward()
    h32 = d["hidden"].clone().requires_grad_()
    logp32, _ = materialized(h32, d["weight"], torch.zeros(()), d["targets"], 1.0)
    (logp32 * torch.tensor([[-0.5, 1.5, 0.0], [0.0, 0.0, 0.0]])).sum().backward()
    assert_close_to_ref(h.grad, h64.grad, h32.grad, msg="grad_hidden")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_advantages_with_t_equal_b_are_per_sequence(backend):
    # Packed, lens [2, 0]: T == B == 2, so a [2] tensor is read per sequence, as policy_loss
    # reads it (documented): on-policy, -A_0 on both tokens, token-mean -> -1.0.
    d = make_batch(B=2, L=3, lengths=[2, 0])
    m = d["mask"]
    res = fused_linear_policy_loss(
        d["hidden"][m], d["weight"], d["targets"][m], None, torch.tensor([1.0, -3.0]),
        cu_seqlens=torch.tensor([0, 2, 2]), backend=backend,
    )  # fmt: skip
    assert res.loss.item() == -1.0


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_per_token_advantages_in_a_chunk_with_as_many_tokens_as_sequences(small_chunks, layout):
    # Valid lengths [2, 0, 15, 15] and chunks of 16 rows: the first chunk holds sequences 0 and 1,
    # 2 tokens for 2 sequences. Its per-token advantages stay per token (T = 32 != B = 4 overall).
    d = make_batch(B=4, L=15, lengths=[2, 0, 15, 15])
    d["adv"] = torch.randn(d["mask"].shape, dtype=torch.float64)
    want = reference(d, torch.float64, 1.0)
    same = reference(d, torch.float32, 1.0)
    res, *got = ours(d, layout, 1.0)
    compare(res, (res, *got), want, same, d["mask"])


BAD_COUNTS = [torch.tensor(0), torch.tensor(-2.0), torch.tensor(float("nan")),
              torch.tensor(float("inf")), float("inf")]  # fmt: skip
COUNT_AGG = {"num_tokens": "token-mean", "num_seqs": "seq-mean-token-sum",
             "max_len": "seq-mean-token-sum-norm"}  # fmt: skip


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("entry", ["function", "module"])
@pytest.mark.parametrize("name", list(COUNT_AGG))
@pytest.mark.parametrize("value", BAD_COUNTS, ids=[repr(v) for v in BAD_COUNTS])
@pytest.mark.parametrize("check_finite", [True, False])
def test_counts_that_are_not_positive_and_finite_raise(backend, entry, name, value, check_finite):
    # Checked before any product, in the host sync the chunk plan makes anyway.
    d = make_batch()
    args = (d["hidden"], d["weight"], d["targets"], d["old"].float(), d["adv"].float())
    kw = dict(agg=COUNT_AGG[name], backend=backend, check_finite=check_finite)
    with pytest.raises(ValueError, match=f"{name} must be a positive"):
        if entry == "module":
            PAPOLoss(**kw)(*args, mask=d["mask"], **{name: value})
        else:
            fused_linear_policy_loss(*args, mask=d["mask"], **kw, **{name: value})


def test_the_result_is_a_fused_policy_loss_output():
    import papo_fast

    d = make_batch(B=2, L=3)
    args = (d["hidden"], d["weight"], d["targets"], d["old"].float(), d["adv"].float())
    res = fused_linear_policy_loss(*args, mask=d["mask"])
    assert type(res) is papo_fast.FusedPolicyLossOutput
    assert type(res).__name__ == "FusedPolicyLossOutput"
    assert papo_fast.FusedPolicyLoss is papo_fast.FusedPolicyLossOutput  # kept for a release
    assert {"FusedPolicyLossOutput", "FusedPolicyLoss"} <= set(papo_fast.__all__)
