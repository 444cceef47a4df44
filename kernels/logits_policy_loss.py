"""The GRPO-family policy loss straight from logits the caller already holds.

    logits_policy_loss(logits, targets, old_logp, advantages, mask=... | cu_seqlens=..., ...)
        -> LogitsPolicyLossOutput (PolicyLossOutput's fields + logp)

    logp    = logits[target] / T - logsumexp(logits / T)       one read of each valid row
    loss    = policy_loss(logp, old_logp, advantages, ...)     every PolicyLossConfig setting
    grad    = dL/dlogp * (onehot(target) - softmax(logits / T)) / T

For logits from a model forward the caller does not control (``fused_linear_policy_loss`` is the
path that never builds them). Layers: the Triton kernels (logits_policy_loss_triton.py) and the
PyTorch path beside them (``logprobs_torch`` / ``grad_logits_torch``, the CPU path, chunked over
rows) -> ``LogitsLogprobsFunction`` (logits -> logp) -> ``logits_policy_loss``, which hands logp to
policy_loss.py's own checks and loss. ``logits_policy_loss_ref`` at the end is the materialized
formula, the oracle of the tests.

Choices:
1. **Memory.** The forward keeps a reference to the logits (no copy) and lse [rows] in fp32; no
   float32 copy of the logits exists at any time (the PyTorch path converts one chunk of rows at
   a time). The backward writes grad_logits into one fresh buffer of the logits' shape and dtype:
   peak = logits + grad_logits, both in the logits' dtype. Sliced logits (``logits[:, :-1]``) are
   read in place through their strides; only a vocabulary dimension without unit stride is
   copied, once, in its own dtype.
2. **Padding is never read.** Rows with mask 0 are skipped: their logits and target ids (e.g.
   -100) may hold anything, and their gradient is 0.
3. **Checks in one read.** The forward counts non-finite logits and flags out-of-range targets
   at valid tokens; one host read raises the error (with ``check_finite``, and always on CPU
   tensors, where the read is free). policy_loss then makes its own (check_finite) read.
4. **logp is returned detached**, e.g. to keep as the next step's old_logp.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._backend import compute_dtype, none_grads, resolve_backend
from .fused_linear_logprobs import chunk_rows
from .logits_policy_loss_triton import grad_logits_triton, logprobs_triton
from .loss_config import PolicyLossConfig
from .policy_loss import Count, PolicyLossOutput, apply_policy_loss, check_inputs
from .policy_loss_ref import policy_loss_ref
from .policy_loss_torch import PerTokenOutputs

LogitsPolicyLossOutput = NamedTuple(
    "LogitsPolicyLossOutput",
    [*PolicyLossOutput.__annotations__.items(), ("logp", torch.Tensor)],
)
LogitsPolicyLossOutput.__doc__ = """PolicyLossOutput's loss and metrics, then ``logp``: the token
log-probs at the temperature, [B, L] or [T], fp32 (fp64 for fp64 logits), detached; 0 at padding."""
_FIELDS = [*LogitsPolicyLossOutput.__annotations__.items(), ("per_token", PerTokenOutputs)]
LogitsPolicyLossTokenOutput = NamedTuple("LogitsPolicyLossTokenOutput", _FIELDS)
LogitsPolicyLossTokenOutput.__doc__ = """LogitsPolicyLossOutput's fields, then ``per_token`` (as in
PolicyLossTokenOutput): the result with per_token=True."""


# ----------------------------------------------------------------------------- PyTorch


def _row_chunks(logits: torch.Tensor, rows: int):
    """(start, end, [end - start, V] view) over the token rows of [B, L, V] or [T, V] logits:
    flat chunks when the rows can be viewed flat, else chunks within each sequence."""
    n_vocab = logits.shape[-1]
    try:
        flat = logits.view(-1, n_vocab)
    except RuntimeError:  # e.g. logits[:, :-1]: rows of one sequence are evenly spaced
        length = logits.shape[1]
        for b in range(logits.shape[0]):
            for s in range(0, length, rows):
                e = min(s + rows, length)
                yield b * length + s, b * length + e, logits[b, s:e]
        return
    for s in range(0, flat.shape[0], rows):
        yield s, min(s + rows, flat.shape[0]), flat[s : s + rows]


def logprobs_torch(logits: torch.Tensor, targets: torch.Tensor, valid, temperature: float):
    """``logprobs_triton``'s outputs in PyTorch, one chunk of rows converted at a time."""
    n_vocab, n = logits.shape[-1], targets.numel()
    acc = compute_dtype(logits)
    logp, lse = (torch.zeros(n, device=logits.device, dtype=acc) for _ in range(2))
    nonfinite, bad_target = (
        torch.zeros(n, device=logits.device, dtype=torch.int32) for _ in range(2)
    )
    for s, e, chunk in _row_chunks(logits, chunk_rows(n, n_vocab, logits.device)):
        ok = valid[s:e].bool() if valid is not None else torch.ones_like(targets[s:e]).bool()
        t = targets[s:e]
        oob = ok & ((t < 0) | (t >= n_vocab))
        z = chunk.to(acc) / temperature  # [rows, V], the chunk's only float copy
        nonfinite[s:e] = (~torch.isfinite(chunk)).sum(1).mul_(ok)
        bad_target[s:e] = oob
        lse_c = torch.logsumexp(z, 1)
        z_t = z.gather(1, torch.where(ok & ~oob, t, 0)[:, None]).squeeze(1)
        logp[s:e] = torch.where(ok, torch.where(oob, math.nan, z_t - lse_c), 0.0)
        lse[s:e] = torch.where(ok, lse_c, 0.0)
    return logp, lse, nonfinite, bad_target


def grad_logits_torch(logits, targets, valid, lse, coef, temperature: float) -> torch.Tensor:
    """``grad_logits_triton`` in PyTorch, one chunk of rows at a time."""
    n_vocab, n = logits.shape[-1], targets.numel()
    acc = compute_dtype(logits)
    grad = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
    flat = grad.view(-1, n_vocab)
    for s, e, chunk in _row_chunks(logits, chunk_rows(n, n_vocab, logits.device)):
        ok = valid[s:e].bool() if valid is not None else None
        t = targets[s:e].clamp(0, n_vocab - 1)  # out of range: only with checks off
        c = coef[s:e, None]
        g = (chunk.to(acc) / temperature).sub_(lse[s:e, None]).exp_().mul_(-c)
        g.scatter_add_(1, t[:, None], c)
        if ok is not None:
            g.masked_fill_(~ok[:, None], 0.0)
        flat[s:e] = g
    return grad


# ----------------------------------------------------------------------------- autograd


class LogitsLogprobsFunction(torch.autograd.Function):
    """logits [B, L, V] | [T, V], targets [rows], valid [rows] | None -> logp [rows] (and the
    non-differentiable check flags nonfinite, bad_target [rows] int32)."""

    @staticmethod
    def forward(ctx, logits, targets, valid, temperature, backend):
        fn = logprobs_triton if backend == "triton" else logprobs_torch
        logp, lse, nonfinite, bad_target = fn(logits, targets, valid, temperature)
        ctx.save_for_backward(logits, targets, valid, lse)
        ctx.temperature, ctx.backend = temperature, backend
        ctx.mark_non_differentiable(nonfinite, bad_target)
        return logp, nonfinite, bad_target

    @staticmethod
    def backward(ctx, grad_logp, _grad_nonfinite, _grad_bad_target):
        logits, targets, valid, lse = ctx.saved_tensors
        coef = (grad_logp.to(lse.dtype) / ctx.temperature).contiguous()  # [rows]
        fn = grad_logits_triton if ctx.backend == "triton" else grad_logits_torch
        return fn(logits, targets, valid, lse, coef, ctx.temperature), *_NO_GRADS


_NO_GRADS = none_grads(LogitsLogprobsFunction.forward)


# ----------------------------------------------------------------------------- checks


def check_logits_inputs(logits, targets, mask, cu_seqlens, temperature) -> None:
    """Shapes and dtypes of logits, targets and mask, and the temperature (policy_loss's checks
    cover the rest, on logits' leading dims)."""
    for name, t in (("logits", logits), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if (mask is None) == (cu_seqlens is None):
        raise ValueError(
            "pass exactly one of mask (padded logits [B, L, V]) and cu_seqlens (packed logits "
            "[T, V]), got " + ("both" if mask is not None else "neither")
        )
    want = 3 if mask is not None else 2
    if logits.dim() != want:
        layout = "[B, L, V] with mask" if mask is not None else "[T, V] with cu_seqlens"
        raise ValueError(f"logits must be {layout}, got shape {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError("logits has an empty vocabulary dimension (V = 0)")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor of token ids, got {targets.dtype}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets has shape {tuple(targets.shape)}, expected logits' leading dims "
            f"{tuple(logits.shape[:-1])}"
        )
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != targets.shape):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask has shape {shape}, expected logits' [B, L] {tuple(targets.shape)}")
    if not (
        isinstance(temperature, int | float)
        and not isinstance(temperature, bool)
        and 0 < temperature < math.inf
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _raise_flagged(nonfinite, bad_target, targets, n_vocab: int, check_finite: bool) -> None:
    """One host read of the forward's flags; the error of the first kind found."""
    counts = torch.stack([bad_target.sum(), nonfinite.sum()]).tolist()
    lead = targets.shape

    def first(flags):
        idx = int(flags.nonzero()[0])
        return idx if len(lead) == 1 else divmod(idx, lead[1])

    if counts[0]:
        where = first(bad_target)
        raise ValueError(
            f"targets has {counts[0]} id(s) outside [0, V={n_vocab}) at valid tokens; first at "
            f"index {where}: {int(targets.reshape(-1)[int(bad_target.nonzero()[0])])}"
        )
    if check_finite and counts[1]:
        raise ValueError(
            f"logits has {counts[1]} non-finite value(s) at valid tokens; first in the row of "
            f"token {first(nonfinite)}"
        )


# ----------------------------------------------------------------------------- functional API


def logits_policy_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    temperature: float = 1.0,
    num_tokens: Count | None = None,
    num_seqs: Count | None = None,
    max_len: Count | None = None,
    config: PolicyLossConfig | None = None,
    check_finite: bool = True,
    backend: str = "auto",
    per_token: bool = False,
    generator: torch.Generator | None = None,
    **settings,
) -> LogitsPolicyLossOutput:
    """``policy_loss`` on the log-probs of ``targets`` under softmax(logits / temperature).

    Args:
        logits: [B, L, V] (with ``mask``) or [T, V] (with ``cu_seqlens``), float32/bf16/fp16/
            float64; row (b, l) or t gives the distribution of the token ``targets`` holds there
            (for a causal LM's output [B, L + 1, V], pass ``logits[:, :-1]``: read in place).
            The only input given a gradient (grad_logits in the logits' dtype).
        targets: integer [B, L] or [T], the sampled token ids, each in [0, V) at valid tokens
            (padding may hold any id, e.g. -100).
        old_logp, advantages, mask, cu_seqlens, ref_logp, rollout_logp, num_tokens, num_seqs,
            max_len, config, **settings: as in ``policy_loss``, with logp's shape being
            logits' leading dims.
        temperature: > 0, the sampler's temperature (logp of logits / temperature).
        check_finite: as in ``policy_loss``, and also an error for non-finite logits at valid
            tokens (one more host read). Out-of-range targets are an error when check_finite or
            on CPU tensors; on CUDA with check_finite=False their logp is NaN.
        backend: "auto" (CUDA -> Triton, CPU -> PyTorch), "torch" or "triton".
        per_token, generator: as in ``policy_loss``: the per-token terms, clip_cov's draw.

    Returns:
        LogitsPolicyLossOutput: policy_loss's loss and metrics, and the detached logp;
        LogitsPolicyLossTokenOutput (the same, then ``per_token``) with per_token.

    Raises:
        ValueError: a bad shape, dtype, layout, temperature or setting, target ids outside
            [0, V), non-finite logits or inputs at valid tokens (check_finite), each named.
        TypeError: a setting that PolicyLossConfig does not have.
    """
    cfg = PolicyLossConfig.resolve(config, settings)
    check_logits_inputs(logits, targets, mask, cu_seqlens, temperature)
    counts = {"num_tokens": num_tokens, "num_seqs": num_seqs, "max_len": max_len}
    verify_cu = check_finite or not getattr(cu_seqlens, "is_cuda", False)
    acc = compute_dtype(logits)
    shape_only = torch.empty(targets.shape, dtype=acc, device="meta")  # logp's shape and dtype
    adv_per_token, _ = check_inputs(
        shape_only, old_logp, advantages, mask, cu_seqlens, ref_logp, rollout_logp, cfg, counts,
        verify_cu,
    )  # fmt: skip
    backend = resolve_backend(
        backend, logits, targets, old_logp, advantages, mask, cu_seqlens, ref_logp, rollout_logp
    )
    if logits.stride(-1) != 1:
        logits = logits.contiguous()  # once, in its own dtype (module docstring, choice 1)
    t1 = targets.reshape(-1).long()
    valid = None if mask is None else (mask != 0).reshape(-1).to(torch.uint8)
    logp, nonfinite, bad_target = LogitsLogprobsFunction.apply(
        logits, t1, valid, float(temperature), backend
    )
    if check_finite or not logits.is_cuda:
        _raise_flagged(nonfinite, bad_target, targets, logits.shape[-1], check_finite)
    logp = logp.view(targets.shape)
    res = apply_policy_loss(
        logp, old_logp, advantages, mask, cu_seqlens, ref_logp, rollout_logp, cfg, adv_per_token,
        counts, check_finite, backend, per_token=per_token, generator=generator,
    )  # fmt: skip
    out = LogitsPolicyLossOutput(*res[: len(PolicyLossOutput._fields)], logp=logp.detach())
    return LogitsPolicyLossTokenOutput(*out, res.per_token) if per_token else out


# ----------------------------------------------------------------------------- reference


def logits_policy_loss_ref(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    **kwargs,
) -> tuple[PolicyLossOutput, torch.Tensor]:
    """The formula a trainer writes, padded layout: log_softmax of logits / T in float32 (float64
    for float64 logits), gather, then ``policy_loss_ref`` (its keyword arguments). Returns its
    output and logp [B, L]; differentiable w.r.t. logits."""
    z = logits.to(compute_dtype(logits)) / temperature
    safe = torch.where(mask.bool(), targets.long(), 0)  # padding ids may be anything
    logp = z.log_softmax(-1).gather(-1, safe[..., None]).squeeze(-1)
    return policy_loss_ref(logp, old_logp, advantages, mask, **kwargs), logp
