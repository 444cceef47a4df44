"""fused_linear_policy_loss on edge-case and bad inputs: named errors, ignore ids at padding,
non-finite hidden states, no valid token, how advantages are read, counts."""

import pytest
import torch
from helpers import assert_close, assert_close_to_ref, lm_head_batch, ulp_atol

import papo_fast.kernels.fused_linear_policy_loss as flpl
from papo_fast.kernels.fused_linear_logprobs import fused_linear_logprobs_ref
from papo_fast.kernels.fused_linear_policy_loss import PAPOLoss, fused_linear_policy_loss


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 token rows: several chunks of whole sequences; a sequence > 64 goes two-pass."""
    monkeypatch.setattr(flpl, "chunk_rows", lambda *a: 16)


def test_bad_inputs_raise():
    d = lm_head_batch()
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
    d = lm_head_batch()
    h, w, t, old, adv, mask = (d[k] for k in ("hidden", "weight", "targets", "old", "adv", "mask"))
    res = fused_linear_policy_loss(h, w, t, old.float(), adv.float(), mask=mask)
    ignored = t.masked_fill(~mask, -100)  # Hugging Face's label padding
    res_ignored = fused_linear_policy_loss(h, w, ignored, old.float(), adv.float(), mask=mask)
    assert_close(res_ignored.loss, res.loss, atol=0)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_non_finite_hidden_is_named_once(small_chunks, layout):
    d = lm_head_batch()
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


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_valid_token_gives_zero_not_nan(backend):
    d = lm_head_batch()
    h = d["hidden"].requires_grad_()
    empty = torch.zeros_like(d["mask"])
    res = fused_linear_policy_loss(h, d["weight"], d["targets"], d["old"].float(),
                                   d["adv"].float(), mask=empty, backend=backend)  # fmt: skip
    res.loss.backward()
    assert res.loss.item() == 0.0 and res.num_tokens.item() == 0 and res.ratio_min.item() == 0.0
    assert h.grad.abs().sum().item() == 0.0 and res.logp.abs().sum().item() == 0.0


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("entry", ["function", "module"])
def test_padded_per_token_advantages_when_valid_tokens_equal_b(backend, entry):
    # B = 2, L = 3, valid tokens [[1, 1, 0], [0, 0, 0]]: 2 valid tokens, as many as sequences.
    # Advantages [B, L] are per token whatever the counts: on-policy (ratio 1) loss_t = -A_t, so
    # token-mean = -(1 + -3) / 2 = +1.0 (read per sequence, A = 1 on both tokens, it is -1.0).
    # d loss / d logp_t = -A_t / 2 = [-0.5, 1.5].
    d = lm_head_batch(b=2, length=3, lengths=[2, 0])
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
    logp, _ = fused_linear_logprobs_ref(h64, d["weight"].double(), d["targets"])
    (logp * torch.tensor([[-0.5, 1.5, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)).sum().backward()
    h32 = d["hidden"].clone().requires_grad_()
    logp32, _ = fused_linear_logprobs_ref(h32, d["weight"], d["targets"])
    (logp32 * torch.tensor([[-0.5, 1.5, 0.0], [0.0, 0.0, 0.0]])).sum().backward()
    assert_close_to_ref(h.grad, h64.grad, h32.grad, msg="grad_hidden")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_advantages_with_t_equal_b_are_per_sequence(backend):
    # Packed, lens [2, 0]: T == B == 2, so a [2] tensor is read per sequence, as policy_loss
    # reads it (documented): on-policy, -A_0 on both tokens, token-mean -> -1.0.
    d = lm_head_batch(b=2, length=3, lengths=[2, 0])
    m = d["mask"]
    res = fused_linear_policy_loss(
        d["hidden"][m], d["weight"], d["targets"][m], None, torch.tensor([1.0, -3.0]),
        cu_seqlens=torch.tensor([0, 2, 2]), backend=backend,
    )  # fmt: skip
    assert res.loss.item() == -1.0


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
    d = lm_head_batch()
    args = (d["hidden"], d["weight"], d["targets"], d["old"].float(), d["adv"].float())
    kw = dict(agg=COUNT_AGG[name], backend=backend, check_finite=check_finite)
    with pytest.raises(ValueError, match=f"{name} must be a positive"):
        if entry == "module":
            PAPOLoss(**kw)(*args, mask=d["mask"], **{name: value})
        else:
            fused_linear_policy_loss(*args, mask=d["mask"], **kw, **{name: value})


def test_the_result_is_a_fused_policy_loss_output():
    import papo_fast

    d = lm_head_batch(b=2, length=3)
    args = (d["hidden"], d["weight"], d["targets"], d["old"].float(), d["adv"].float())
    res = fused_linear_policy_loss(*args, mask=d["mask"])
    assert type(res) is papo_fast.FusedPolicyLossOutput
    assert type(res).__name__ == "FusedPolicyLossOutput"
    assert papo_fast.FusedPolicyLoss is papo_fast.FusedPolicyLossOutput  # kept for a release
    assert {"FusedPolicyLossOutput", "FusedPolicyLoss"} <= set(papo_fast.__all__)
