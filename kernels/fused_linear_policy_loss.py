"""The GRPO-family policy loss straight from the LM head: three matrix products, no [T, V] logits.

    fused_linear_policy_loss(hidden, weight, targets, old_logp, advantages, ...)
      -> FusedPolicyLossOutput
      = policy_loss(log_softmax((hidden @ weight.T + bias) / temperature)[targets], old_logp, ...)

The floor is three products: logits, grad_hidden, grad_weight. A loss that computes log-probs in the
forward and recomputes the logits in the backward does four. We reach three by forming the gradient
during the forward pass (liger-kernel's trick): for each chunk of WHOLE sequences,

    z = chunk logits               -> lse, logp (and entropy): fused_linear_logprobs' chunk steps
    policy_loss(logp_chunk, ...)   with the GLOBAL num_tokens/num_seqs/max_len, so that the chunk's
                                   loss and gradient are exactly its share of the batch's
                                   (docs/design.md, "Global counts")
    grad_logp = autograd.grad(...) -> grad_logits = (onehot - softmax) * grad_logp / temperature,
                                   in place in the chunk's buffer (the forward's exp is reused)
    grad_hidden[chunk] = grad_logits @ W;  grad_W += grad_logits.T @ h;  grad_b += sum(grad_logits)

and the backward only scales the stored gradients by grad_output (the loss is linear in it).
The loss formula is ``policy_loss``'s; nothing here restates it.

Chunks hold whole sequences, so the sequence-level ratio (GSPO) and 1/|y_i| are exact inside
them. Two passes instead (logp of every token, then policy_loss, then a gradient pass that
recomputes the logits: one more product, the same numbers) only when one sequence has more than 4x
the chunk's row budget of tokens: its logits alone would break the memory bound, and policy_loss
cannot split a sequence.

The padded layout is packed first (valid tokens gathered, cu_seqlens from the mask): padding gets
no logits, a quarter of padding costs a quarter less, and policy_loss's numbers are the same.

Metrics are combined across chunks exactly: fractions and means weighted by each chunk's valid
tokens, min/max over the chunks that hold any. logp and entropy come back detached.
"""

from __future__ import annotations

from itertools import pairwise
from typing import NamedTuple

import torch

from ._backend import compute_dtype, none_grads, resolve_backend
from .fused_linear_logprobs import (
    FusedLinearLogprobsFunction,
    accumulate_grads,
    check_lm_head_inputs,
    chunk_grad,
    chunk_logits,
    chunk_rows,
    chunk_stats,
    logits_buffer,
)
from .loss_config import COV_TYPES, PolicyLossConfig
from .policy_loss import (
    Count,
    PolicyLossOutput,
    apply_policy_loss,
    bad_count_flags,
    check_inputs,
    raise_bad_counts,
)

_EXTRAS = [("logp", "torch.Tensor"), ("entropy", "torch.Tensor")]  # after PolicyLossOutput's
FusedPolicyLossOutput = NamedTuple(
    "FusedPolicyLossOutput", [*PolicyLossOutput.__annotations__.items(), *_EXTRAS]
)
FusedPolicyLossOutput.__doc__ = """PolicyLossOutput's fields, then ``logp`` and ``entropy``.

``loss`` is differentiable w.r.t. hidden, weight and bias; the metrics are over the whole batch.
``logp``: like targets, float32 (float64 for float64 inputs), detached. ``entropy``: the same, or
None unless asked for. ``PolicyLossOutput(*result[: len(PolicyLossOutput._fields)])`` drops them.
"""
FusedPolicyLoss = FusedPolicyLossOutput  # the old name, kept for one release

# How each PolicyLossOutput metric combines across chunks; a field added there must be placed here.
_SLOT = {name: i for i, name in enumerate(PolicyLossOutput._fields[1:])}
_MEANS = [
    _SLOT[k] for k in ("clip_frac_low", "clip_frac_high", "dual_clip_frac", "kl", "ratio_mean")
]
_RMIN, _RMAX, _NTOK, _NONFINITE = (_SLOT[k] for k in ("ratio_min", "ratio_max", "num_tokens",
                                                      "num_nonfinite"))  # fmt: skip
if len(_SLOT) != len(_MEANS) + 4:
    raise ImportError(f"fused_linear_policy_loss does not know how to combine {list(_SLOT)}")


class _Batch(NamedTuple):
    """The non-differentiable inputs of the loss (packed layout), and the chunks of sequences."""

    targets: torch.Tensor  # [T]
    old_logp: torch.Tensor | None  # [T]
    advantages: torch.Tensor  # [B] or [T]
    cu_seqlens: torch.Tensor  # [B + 1]
    ref_logp: torch.Tensor | None  # [T]
    rollout_logp: torch.Tensor | None  # [T]
    per_token_adv: bool  # read in the caller's layout, before packing
    cfg: PolicyLossConfig
    counts: dict  # num_tokens / num_seqs / max_len of the whole batch (or the caller's)
    backend: str
    chunks: list[tuple[int, int, int, int]]  # (seq start, seq end, token start, token end)


def _chunk_loss(batch: _Batch, logp: torch.Tensor, chunk) -> PolicyLossOutput:
    """policy_loss on the sequences [s0, s1) = tokens [t0, t1); logp is the chunk's [t1 - t0]."""
    s0, s1, t0, t1 = chunk
    part = lambda t: None if t is None else t[t0:t1]  # noqa: E731
    return apply_policy_loss(
        logp,
        part(batch.old_logp),
        batch.advantages[t0:t1] if batch.per_token_adv else batch.advantages[s0:s1],
        None,
        batch.cu_seqlens[s0 : s1 + 1] - t0,
        part(batch.ref_logp),
        part(batch.rollout_logp),
        batch.cfg,
        batch.per_token_adv,  # a chunk's T may equal its B: the reading is the caller's
        batch.counts,
        False,  # finiteness: one check for the whole batch, after the chunks
        batch.backend,
    )


def _combine(metrics: list[torch.Tensor]) -> torch.Tensor:
    """Per-chunk metric vectors [C, M] -> the batch's [M]: token-weighted means, min/max over the
    chunks with tokens (0 when there are none, as policy_loss reports), sums of counts."""
    m = torch.stack(metrics)
    n = m[:, _NTOK]
    total = n.sum()
    has = n > 0
    out = torch.empty_like(m[0])
    out[_MEANS] = (m[:, _MEANS] * n[:, None]).sum(0) / total.clamp(min=1)
    inf = torch.full_like(n, float("inf"))
    out[_RMIN] = torch.where(has, m[:, _RMIN], inf).min().where(total > 0, 0.0)
    out[_RMAX] = torch.where(has, m[:, _RMAX], -inf).max().where(total > 0, 0.0)
    out[_NTOK], out[_NONFINITE] = total, m[:, _NONFINITE].sum()
    return out


class FusedLinearPolicyLossFunction(torch.autograd.Function):
    """hidden [T, H], weight [V, H], bias [V] | None -> (loss, metrics [9], logp [T], entropy).

    The forward does the three products; saves grad_hidden, grad_bias (fp32), grad_weight (w_acc).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, batch, temperature, entropy, backend, need, w_acc):
        need_h, need_w, need_b = need
        acc = compute_dtype(hidden)
        logp = hidden.new_empty(hidden.shape[0], dtype=acc)
        ent = torch.empty_like(logp) if entropy else None
        grad_h = torch.empty(hidden.shape, device=hidden.device, dtype=acc) if need_h else None
        grad_w = weight.new_zeros(weight.shape, dtype=w_acc) if need_w else None
        grad_b = torch.zeros(weight.shape[0], device=weight.device, dtype=acc) if need_b else None
        losses, metrics = [], []
        buf = logits_buffer(max(c[3] - c[2] for c in batch.chunks), weight)
        for chunk in batch.chunks:
            t0, t1 = chunk[2], chunk[3]
            h, t = hidden[t0:t1], batch.targets[t0:t1]
            z = chunk_logits(h, weight, bias, 1.0 / temperature, buf)
            lse, logp[t0:t1], ent_c, state = chunk_stats(z, t, entropy, backend)
            if entropy:
                ent[t0:t1] = ent_c
            with torch.enable_grad():
                lp = logp[t0:t1].detach().requires_grad_(any(need))
                res = _chunk_loss(batch, lp, chunk)
            if any(need):
                (grad_logp,) = torch.autograd.grad(res.loss, lp)
                g = chunk_grad(state, t, lse, grad_logp / temperature, backend)
                gh = grad_h[t0:t1] if need_h else None
                accumulate_grads(g, h, weight, gh, grad_w, grad_b)
            losses.append(res.loss.detach())
            metrics.append(torch.stack([x.to(acc) for x in res[1:]]))
            z = state = g = None  # an fp32 copy of half-precision logits is freed here
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.scaled = False
        out = (torch.stack(losses).sum(), _combine(metrics), logp, ent)
        ctx.mark_non_differentiable(*(x for x in out[1:] if x is not None))
        return out

    @staticmethod
    def backward(ctx, grad_loss, *_):
        # Scaled in place: a copy would double the [V, H] buffer at the peak (a grad_weight summed
        # in the weight's dtype is returned as it is). So a second backward cannot reuse them.
        if ctx.scaled:
            raise RuntimeError("fused_linear_policy_loss supports one backward per forward")
        ctx.scaled = True
        grads = [
            None if g is None else g.mul_(grad_loss).to(dtype)
            for g, dtype in zip(ctx.saved_tensors, ctx.dtypes, strict=True)
        ]
        return *grads, *_NO_GRADS


# hidden, weight and bias have gradients; the inputs after them none
_NO_GRADS = none_grads(FusedLinearPolicyLossFunction.forward, differentiable=3)


def _raise_non_finite(batch: _Batch, seq_counts: torch.Tensor) -> None:
    """The chunks counted non-finite values at valid tokens: name the input (the error path may
    look again), else the log-probs computed from hidden / weight / bias."""
    adv = batch.advantages if batch.per_token_adv else batch.advantages[seq_counts > 0]
    named = ("old_logp", batch.old_logp), ("advantages", adv), ("rollout_logp", batch.rollout_logp)
    uses_ref = batch.cfg.uses_ref  # ref_logp is read only then
    for name, t in (*named, ("ref_logp", batch.ref_logp if uses_ref else None)):
        if t is not None and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{name} has {bad} non-finite value(s) among the valid tokens")
    raise ValueError(
        "non-finite log-probs computed from hidden / weight / bias (NaN or inf in them, or logits "
        "that overflow)"
    )


def _checked_grad_weight_dtype(value) -> str:
    if value not in ("float32", "weight"):  # grad_weight's accumulator: fp32, or the weight's dtype
        raise ValueError(f"grad_weight_dtype must be 'float32' or 'weight', got {value!r}")
    return value


def _plan_chunks(cu: list[int], rows: int):
    """Greedy chunks of whole sequences of at most ``rows`` tokens (one sequence at least; empty
    sequences ride along); None when a sequence is longer than 4 x rows (the two-pass path)."""
    if max(y - x for x, y in pairwise(cu)) > 4 * rows:
        return None
    chunks, s0, n = [], 0, len(cu) - 1
    for s in range(n):  # sequence s is tokens [cu[s], cu[s + 1])
        if cu[s] > cu[s0] and cu[s + 1] - cu[s0] > rows:
            chunks.append((s0, s, cu[s0], cu[s]))
            s0 = s
    chunks.append((s0, n, cu[s0], cu[n]))
    return chunks


def _pack(mask, hidden, targets, old_logp, advantages, ref_logp, rollout_logp, per_token_adv):
    """Padded [B, L] -> packed [T_valid]: padding gets no logits. Exact: policy_loss gives both
    layouts the same numbers. Returns the packed tensors, cu_seqlens and the valid positions."""
    valid = mask.reshape(-1) != 0
    idx = valid.nonzero().squeeze(1)  # [T_valid], one host sync
    lens = (mask != 0).sum(1)
    cu_seqlens = torch.cat([lens.new_zeros(1), lens.cumsum(0)])
    if idx.numel() == valid.numel():  # no padding: views, no copies
        flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
        hidden = hidden.reshape(-1, hidden.shape[-1])
    else:
        flat = lambda t: None if t is None else t.reshape(-1).index_select(0, idx)  # noqa: E731
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx)  # grad scatters back
    advantages = flat(advantages) if per_token_adv else advantages
    packed = (hidden, flat(targets), flat(old_logp), advantages, flat(ref_logp), flat(rollout_logp))
    return packed, cu_seqlens, idx


def _unpack(x: torch.Tensor | None, idx: torch.Tensor, shape) -> torch.Tensor | None:
    """[T_valid] -> padded ``shape``, 0 at the padding."""
    return None if x is None else x.new_zeros(shape.numel()).index_copy_(0, idx, x).view(shape)


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    num_tokens: Count | None = None,
    num_seqs: Count | None = None,
    max_len: Count | None = None,
    config: PolicyLossConfig | None = None,
    check_finite: bool = True,
    backend: str = "auto",
    grad_weight_dtype: str = "float32",
    **settings,
) -> FusedPolicyLossOutput:
    """``policy_loss`` of the log-probs of ``hidden @ weight.T + bias``, without the logits.

    Args:
        hidden: [B, L, H] with ``mask`` (padded) or [T, H] with ``cu_seqlens`` (packed); any float
            dtype, shared by weight and bias. Receives a gradient, as do weight and bias.
        weight: [V, H], the LM head.
        targets: int [B, L] or [T], the sampled tokens in [0, V); padded positions may hold any id.
        old_logp, advantages, mask, cu_seqlens, ref_logp, rollout_logp: as in ``policy_loss``, laid
            out like targets (advantages [B] per sequence or per token).
        bias: optional [V].
        temperature: > 0, the sampler's: logits are divided by it before the softmax.
        return_entropy: also return each token's entropy (a detached metric).
        num_tokens, num_seqs, max_len, check_finite: as in ``policy_loss``: the optimizer step's
            global counts (None: this call's own), and the finiteness check.
        config: the loss settings (PolicyLossConfig); None: its defaults.
        backend: "auto" (Triton softmax kernels on CUDA, PyTorch on CPU), "torch" or "triton".
        grad_weight_dtype: "float32": grad_weight summed over the chunks in fp32 (fp64 for fp64);
            "weight": in the weight's dtype, half the [V, H] buffer for bf16 / fp16, one rounding
            per chunk (BENCHMARKS.md, "Peak memory"). grad_hidden and grad_bias stay fp32.
        **settings: PolicyLossConfig's fields by name (``agg="seq-mean-token-sum"``), replacing
            config's.

    Returns:
        FusedPolicyLossOutput: PolicyLossOutput's loss and metrics, then logp (and entropy),
        detached, laid out like targets (0 at padded positions: padding gets no logits).

    Raises:
        ValueError: fused_linear_logprobs' input errors, and policy_loss's, named.
        TypeError: a setting that PolicyLossConfig does not have, or a config of another type.
    """
    cfg = PolicyLossConfig.resolve(config, settings)
    _checked_grad_weight_dtype(grad_weight_dtype)
    tensors = isinstance(mask, torch.Tensor) and isinstance(targets, torch.Tensor)
    if tensors and mask.shape == targets.shape:  # padding may hold any id (e.g. -100): no logits
        targets = targets.masked_fill(mask == 0, 0)
    backend = check_lm_head_inputs(hidden, weight, targets, bias, temperature, backend)
    if (mask is not None and hidden.dim() != 3) or (cu_seqlens is not None and hidden.dim() != 2):
        shape = tuple(hidden.shape)
        raise ValueError(
            f"hidden must be [B, L, H] with mask or [T, H] with cu_seqlens, got {shape}"
        )
    acc = compute_dtype(hidden)
    w_acc = weight.dtype if grad_weight_dtype == "weight" else acc
    user_counts = {"num_tokens": num_tokens, "num_seqs": num_seqs, "max_len": max_len}
    # policy_loss's checks on the whole batch before any product; logp is a zero-stride stand-in
    # (no memory, no pass). Finiteness is counted in the chunks' own passes. The advantages are
    # read per token or per sequence here, in the caller's layout: packing can make T equal B.
    logp_like = torch.zeros((), device=targets.device, dtype=acc).expand(targets.shape)
    per_token_adv, _ = check_inputs(
        logp_like, old_logp, advantages, mask, cu_seqlens, ref_logp, rollout_logp, cfg,
        user_counts, verify_cu=False,
    )  # fmt: skip
    resolve_backend(backend, hidden, old_logp, advantages, mask, cu_seqlens, ref_logp, rollout_logp)
    padded_shape, idx = targets.shape, None
    if mask is not None:
        packed, cu_seqlens, idx = _pack(
            mask, hidden, targets, old_logp, advantages, ref_logp, rollout_logp, per_token_adv
        )
        hidden, targets, old_logp, advantages, ref_logp, rollout_logp = packed
    # The one host sync of the chunk plan: cu_seqlens (the layout's check), and the values of the
    # caller's tensor counts (a 0 would make the loss and its gradient 0 in silence).
    cu = torch.cat([cu_seqlens, bad_count_flags(user_counts, cu_seqlens)]).tolist()
    raise_bad_counts(user_counts, cu[cu_seqlens.numel() :])
    cu = cu[: cu_seqlens.numel()]
    if cu[0] != 0 or cu[-1] != targets.numel() or any(x > y for x, y in pairwise(cu)):
        raise ValueError(f"cu_seqlens must rise from 0 to len(targets) = {targets.numel()}")
    rows = chunk_rows(max(hidden.shape[0], 1), weight.shape[0], hidden.device)
    chunks = None if cfg.loss_type in COV_TYPES else _plan_chunks(cu, rows)  # whole-batch cov
    h2, weight, t1 = hidden.contiguous(), weight.contiguous(), targets.long()

    if chunks is None:  # two passes: logp, policy_loss, then the logprobs backward
        logp, ent = FusedLinearLogprobsFunction.apply(
            h2, weight, bias, t1, float(temperature), return_entropy, backend, rows, w_acc
        )
        res = apply_policy_loss(
            logp, old_logp, advantages, None, cu_seqlens, ref_logp, rollout_logp, cfg,
            per_token_adv, user_counts, check_finite, backend,
        )  # fmt: skip
        loss, metrics, logp = res.loss, res[1:], logp.detach()
    else:
        grad_on = torch.is_grad_enabled()
        need = tuple(grad_on and t is not None and t.requires_grad for t in (h2, weight, bias))
        seq_counts = cu_seqlens[1:] - cu_seqlens[:-1]
        # policy_loss's own defaults, over the whole batch; at least 1, as a batch with no valid
        # token has a 0 loss either way
        tokens, seqs, longest = seq_counts.sum(), (seq_counts > 0).sum(), seq_counts.max()
        local = {"num_tokens": tokens, "num_seqs": seqs, "max_len": longest}
        counts = {k: local[k].clamp(min=1) if v is None else v for k, v in user_counts.items()}
        batch = _Batch(
            t1, old_logp, advantages, cu_seqlens, ref_logp, rollout_logp, per_token_adv, cfg,
            counts, backend, chunks,
        )  # fmt: skip
        loss, metrics, logp, ent = FusedLinearPolicyLossFunction.apply(
            h2, weight, bias, batch, float(temperature), return_entropy, backend, need, w_acc
        )
        if check_finite and bool(metrics[_NONFINITE] > 0):  # one sync for the whole batch
            _raise_non_finite(batch, seq_counts)
        metrics = metrics.unbind()
    if idx is not None:
        logp, ent = _unpack(logp, idx, padded_shape), _unpack(ent, idx, padded_shape)
    return FusedPolicyLossOutput(loss, *metrics, logp, ent)


class PAPOLoss(torch.nn.Module):
    """The drop-in loss of a PAPO / GRPO trainer: holds the loss settings (a PolicyLossConfig,
    resolved once), takes hidden states and the LM head.

    PAPO differs from GRPO in its advantages (``papo_advantages``), not in this loss.

    Args:
        config: the loss settings (PolicyLossConfig); None: its defaults, the paper's recipe.
        temperature, return_entropy, check_finite, backend, grad_weight_dtype: as in
            ``fused_linear_policy_loss``.
        **settings: PolicyLossConfig's fields by name, replacing config's.

    Example:
        loss_fn = PAPOLoss(PolicyLossConfig(agg="token-mean"), temperature=1.0)
        out = loss_fn(hidden, model.lm_head.weight, completion_ids, old_logp, advantages,
                      mask=completion_mask, num_tokens=tokens_in_step)
        out.loss.backward()
    """

    def __init__(
        self,
        config: PolicyLossConfig | None = None,
        *,
        temperature: float = 1.0,
        return_entropy: bool = False,
        check_finite: bool = True,
        backend: str = "auto",
        grad_weight_dtype: str = "float32",
        **settings,
    ) -> None:
        super().__init__()
        self.config = PolicyLossConfig.resolve(config, settings)
        self.temperature, self.return_entropy = temperature, return_entropy
        self.check_finite, self.backend = check_finite, backend
        self.grad_weight_dtype = _checked_grad_weight_dtype(grad_weight_dtype)

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        old_logp: torch.Tensor | None,
        advantages: torch.Tensor,
        *,
        bias: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        ref_logp: torch.Tensor | None = None,
        rollout_logp: torch.Tensor | None = None,
        num_tokens: Count | None = None,
        num_seqs: Count | None = None,
        max_len: Count | None = None,
    ) -> FusedPolicyLossOutput:
        return fused_linear_policy_loss(
            hidden, weight, targets, old_logp, advantages, bias=bias,
            temperature=self.temperature, return_entropy=self.return_entropy, mask=mask,
            cu_seqlens=cu_seqlens, ref_logp=ref_logp, rollout_logp=rollout_logp,
            num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len, config=self.config,
            check_finite=self.check_finite, backend=self.backend,
            grad_weight_dtype=self.grad_weight_dtype,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"{self.config}, temperature={self.temperature}, "
            f"return_entropy={self.return_entropy}, check_finite={self.check_finite}, "
            f"backend={self.backend!r}, grad_weight_dtype={self.grad_weight_dtype!r}"
        )
