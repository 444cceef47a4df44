"""The clipped GRPO-family token loss, forward and backward in one pass over the tokens.

    policy_loss(logp, old_logp, advantages, mask=... | cu_seqlens=..., ...) -> PolicyLossOutput

Layers: two backends with the same outputs, the Triton kernels and their launcher
(policy_loss_triton.py) and the PyTorch path (policy_loss_torch.py, the CPU path) →
``PolicyLossFunction`` → ``policy_loss`` → ``PolicyLossModule``. The settings are a
PolicyLossConfig (loss_config.py); the formulas are docs/design.md's ("The policy loss"), written
out to be read in policy_loss_ref.py, the reference of the tests.

The loss is linear in the upstream gradient, so the forward pass writes d(loss)/d(logp), divided
by the global denominator D when the counts that make D are numbers (the trainer's case), and the
backward only scales it in place: by grad_output, touching no token when that is exactly 1, or by
grad_output / D when D came from tensors or this call's own counts (known only after the token
pass). So there is one backward per forward. Aggregation (m = mask, ℓ = per-token loss):

    token-mean               Σ m·ℓ / N_tokens
    seq-mean-token-mean      Σ_i (Σ_t m·ℓ / |y_i|) / N_seqs
    seq-mean-token-sum       Σ m·ℓ / N_seqs
    seq-mean-token-sum-norm  Σ m·ℓ / (N_seqs · L_max)
    token-sum                Σ m·ℓ (no denominator)

N_tokens, N_seqs and L_max are the caller's ``num_tokens``/``num_seqs``/``max_len`` when given
(counts over the whole optimizer step, so summed micro-batch losses have exactly the full-batch
gradient; docs/design.md, "Global counts"), else local: valid tokens, sequences with at least one
valid token (an empty sequence adds 0, never NaN), longest valid sequence. Sequences must not be
split across calls (the ratio and 1/|y_i| are per sequence; docs/design.md, "Whole sequences").
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._backend import compute_dtype, none_grads, resolve_backend
from .loss_config import PolicyLossConfig
from .policy_loss_checks import (
    Count,
    bad_count_flags,
    check_inputs,
    raise_bad_counts,
)
from .policy_loss_cov import cov_selection
from .policy_loss_finalize import (
    finalize_torch,
    finalize_triton,
    folded_inv_denom,
    reduce_partials,
)
from .policy_loss_torch import (
    CHECKED,
    CLIP_HIGH,
    CLIP_LOW,
    COUNT,
    DUAL_CLIP,
    KL,
    NONFINITE_LOGP,
    NONFINITE_ROLLOUT,
    RATIO,
    RATIO_MAX,
    RATIO_MIN,
    PerTokenOutputs,
    per_token_outputs,
    policy_loss_torch,
)
from .policy_loss_triton import needs_seq_counts, policy_loss_triton, scale_grad_


class PolicyLossOutput(NamedTuple):
    """The loss and its metrics, all 0-dim tensors from the same pass (metrics are detached).

    Means and fractions are over the valid tokens of this call (0 when there are none).
    """

    loss: torch.Tensor  # [] float32 (float64 for float64 logp); differentiable w.r.t. logp
    # ppo: shares of tokens clipped where the clip binds (A < 0 / A > 0); cispo: of tokens whose
    # weight is clipped, any A; sapo, gpg: 0 (docs/design.md, "Loss types")
    clip_frac_low: torch.Tensor  # [] share of tokens clipped at 1 - eps_low
    clip_frac_high: torch.Tensor  # [] share of tokens clipped at 1 + eps_high
    dual_clip_frac: torch.Tensor  # [] share of tokens bounded by the dual clip (A < 0)
    kl: torch.Tensor  # [] mean KL term as in the loss (0 when beta == 0: ref_logp is not read)
    ratio_mean: torch.Tensor  # [] mean ratio (the sequence ratio under ratio_level="sequence")
    ratio_min: torch.Tensor  # []
    ratio_max: torch.Tensor  # []
    num_tokens: torch.Tensor  # [] valid tokens in this call
    num_nonfinite: torch.Tensor  # [] non-finite input values at valid tokens, all inputs read


PolicyLoss = PolicyLossOutput  # the old name, kept for one release
_FIELDS = [*PolicyLossOutput.__annotations__.items(), ("per_token", PerTokenOutputs)]
PolicyLossTokenOutput = NamedTuple("PolicyLossTokenOutput", _FIELDS)
PolicyLossTokenOutput.__doc__ = """PolicyLossOutput's fields, then ``per_token`` (PerTokenOutputs):
policy_loss's result with per_token=True. ``PolicyLossOutput(*result[:-1])`` drops it."""

# Where each metric of PolicyLossOutput is in the finalized stats vector (policy_loss_torch.py);
# num_nonfinite is the sum of the NONFINITE_* slots.
METRIC_SLOTS = {
    "clip_frac_low": CLIP_LOW,
    "clip_frac_high": CLIP_HIGH,
    "dual_clip_frac": DUAL_CLIP,
    "kl": KL,
    "ratio_mean": RATIO,
    "ratio_min": RATIO_MIN,
    "ratio_max": RATIO_MAX,
    "num_tokens": COUNT,
}


# -------------------------------------------------------------------------------------------------
# autograd.Function: forward writes the gradient, backward scales it
# -------------------------------------------------------------------------------------------------


class PolicyLossFunction(torch.autograd.Function):
    """loss = stats[LOSS] / D; d loss / d logp = grad_output · grad / D (forward saves grad, and
    divides it by D already when the counts are numbers)."""

    @staticmethod
    def forward(ctx, logp, old_logp, advantages, mask, cu_seqlens, ref_logp, rollout_logp, cfg,
                adv_per_token, num_tokens, num_seqs, max_len, backend, is_weights,
                cov_select=None, per_token=False):  # fmt: skip
        counts = (num_tokens, num_seqs, max_len)
        dtype = compute_dtype(logp)
        inputs = (logp, old_logp, advantages, mask, cu_seqlens, ref_logp, rollout_logp, cfg)
        folded = folded_inv_denom(cfg, *counts)  # 1 / D, or None: known after the token pass
        grad_scale = 1.0 if folded is None else folded
        if backend == "triton":  # local N_seqs (and L_max) need per-sequence counts
            need = needs_seq_counts(cfg, num_seqs, max_len)
            grad, partials, seq_counts, tokens = policy_loss_triton(
                *inputs, adv_per_token, need, grad_scale, is_weights, cov_select, per_token
            )
            if not any(isinstance(c, torch.Tensor) for c in counts):
                loss, inv_denom, metrics = finalize_triton(
                    partials, seq_counts, cfg, *counts, dtype
                )
            else:
                stats = reduce_partials(partials, dtype)
                loss, inv_denom, metrics = finalize_torch(cfg, stats, seq_counts, *counts)
        else:
            grad, stats, seq_counts, tokens = policy_loss_torch(
                *inputs, adv_per_token, grad_scale, is_weights, cov_select, per_token
            )
            loss, inv_denom, metrics = finalize_torch(cfg, stats, seq_counts, *counts)
        ctx.save_for_backward(grad, inv_denom)
        ctx.folded, ctx.backend, ctx.scaled = folded is not None, backend, False
        tokens = tokens or ()  # per token: loss, KL, flags
        ctx.mark_non_differentiable(metrics, *tokens)
        return loss, metrics, *tokens

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics, *_grad_tokens):
        # Scaled in place: a copy would be a second [T] buffer and a pass that writes it; the
        # saved gradient is then spent, so a second backward cannot reuse it.
        if ctx.scaled:
            raise RuntimeError(
                "policy_loss's backward runs once per forward: its saved gradient was scaled in "
                "place by the first; call policy_loss again for another backward"
            )
        ctx.scaled = True
        grad, inv_denom = ctx.saved_tensors
        scale = grad_loss if ctx.folded else grad_loss * inv_denom  # [] on the device, no sync
        if ctx.backend == "triton":  # each program reads the scale; exactly 1: no token touched
            return scale_grad_(grad, scale), *_NO_GRADS
        if grad.device.type == "cpu" and scale.item() == 1.0:  # a CPU read is free
            return grad, *_NO_GRADS
        return grad.mul_(scale), *_NO_GRADS


_NO_GRADS = none_grads(PolicyLossFunction.forward)  # for every input after logp


# -------------------------------------------------------------------------------------------------
# Functional API and module
# -------------------------------------------------------------------------------------------------


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    rollout_is_weights: torch.Tensor | None = None,
    num_tokens: Count | None = None,
    num_seqs: Count | None = None,
    max_len: Count | None = None,
    config: PolicyLossConfig | None = None,
    check_finite: bool = True,
    backend: str = "auto",
    per_token: bool = False,
    generator: torch.Generator | None = None,
    **settings,
) -> PolicyLossOutput:
    """The clipped policy-gradient loss of GRPO / PAPO / DAPO / GSPO / Dr. GRPO, fused.

    Per token (docs/design.md, "The policy loss"): ρ = exp(logp − old_logp),
    pg = −min(ρ·A, clip(ρ, 1 − eps_low, 1 + eps_high)·A), with dual_clip=c pg = min(pg, −c·A) where
    A < 0; loss_t = w·pg + beta·KL_t, aggregated by ``agg``. ``loss_type`` swaps pg for CISPO's,
    SAPO's or GPG's term. The settings, their defaults and their allowed values are
    PolicyLossConfig's (kernels/loss_config.py).

    Args:
        logp: [B, L] (with ``mask``) or [T] (with ``cu_seqlens``) log-probs of the sampled tokens
            under the current policy; float32/bf16/fp16/float64. The only input given a gradient.
        old_logp: like logp, the log-probs at sampling time (the PPO "old" policy). None means
            on-policy: the ratio is exp(logp − sg(logp)) = 1, gradient A·∂logp.
        advantages: one per sequence, [B] (broadcast over its tokens), or per token, like logp.
            The shape decides (``advantages_per_token``): padded, [B] or [B, L]; packed, [B] or
            [T]. A packed call with T == B fits both: it is read per sequence (the readings
            differ only when a sequence is empty; per-token values then need the padded layout).
        mask: [B, L], nonzero = valid token (padded layout). Masked positions may hold anything.
        cu_seqlens: [B + 1] int32/int64 offsets of the sequences in logp (packed layout, all valid).
        ref_logp: like logp, the reference policy's log-probs; read only when beta > 0.
        rollout_logp: like logp, the sampler's log-probs (e.g. vLLM's). Given, pg_t is multiplied by
            the detached weight min(exp(old_logp − rollout_logp), is_cap) (truncated importance
            sampling; old_logp None uses logp's value); the KL term is not weighted.
            ``is_level="sequence"``: one weight per sequence; ``rollout_rs``: rejection.
        rollout_is_weights: instead of rollout_logp, the caller's weights, used as given
            (detached, not truncated): like logp (per token) or [B] / [B, 1] (per sequence).
        num_tokens, num_seqs, max_len: the global N_tokens, N_seqs and L_max of the optimizer step
            (numbers or 1-element tensors), each > 0 and finite; None uses this call's own counts
            (module docstring). A tensor's value is checked in check_finite's sync; unchecked, a
            bad one makes the loss NaN.
        config: the loss settings (PolicyLossConfig); None: its defaults.
        check_finite: raise a ValueError naming the first input with a non-finite valid value, or
            a tensor count that is not > 0 and finite (one host sync for both; the non-finite
            counts come from the loss's own pass). False: no sync on the Triton path (the PyTorch
            path, the CPU's, syncs once anyway), and the loss goes NaN/inf.
        backend: "auto" (CUDA → Triton, CPU → PyTorch), "torch" or "triton".
        per_token: also return each token's loss, KL and clip flags before the aggregation
            (PolicyLossTokenOutput) from the same pass; the loss is the same either way.
        generator: clip_cov's random draw (policy_loss_cov.py), a torch.Generator on logp's
            device; None: the device's default generator. Other loss types draw nothing.
        **settings: PolicyLossConfig's fields by name (``eps_low=0.1``), replacing config's.

    Returns:
        PolicyLossOutput: the loss and its metrics (0-dim); PolicyLossTokenOutput with per_token.

    Raises:
        ValueError: an input of the wrong shape, dtype or layout, a setting out of range, a count
            that is not > 0 and finite, non-finite values at valid tokens (check_finite), each
            named.
        TypeError: a setting that PolicyLossConfig does not have, or a config of another type.
    """
    cfg = PolicyLossConfig.resolve(config, settings)
    counts = {"num_tokens": num_tokens, "num_seqs": num_seqs, "max_len": max_len}
    verify_cu = check_finite or not getattr(cu_seqlens, "is_cuda", False)
    adv_per_token, is_weights = check_inputs(
        logp, old_logp, advantages, mask, cu_seqlens, ref_logp, rollout_logp, cfg, counts,
        verify_cu, rollout_is_weights,
    )  # fmt: skip
    return apply_policy_loss(
        logp, old_logp, advantages, mask, cu_seqlens, ref_logp, rollout_logp, cfg, adv_per_token,
        counts, check_finite, backend, is_weights, per_token=per_token, generator=generator,
    )  # fmt: skip


def apply_policy_loss(
    logp, old_logp, advantages, mask, cu_seqlens, ref_logp, rollout_logp, cfg: PolicyLossConfig,
    adv_per_token: bool, counts: dict, check_finite: bool, backend: str, is_weights=None, *,
    per_token: bool = False, generator: torch.Generator | None = None,
) -> PolicyLossOutput:  # fmt: skip
    """``policy_loss`` on inputs that ``check_inputs`` accepted, with its reading of the
    advantages (so a caller that repacks them keeps the reading of its own layout)."""
    ref_logp = ref_logp if cfg.uses_ref else None
    backend = resolve_backend(
        backend, logp, old_logp, advantages, mask, cu_seqlens, ref_logp, rollout_logp, is_weights
    )
    # clip_cov / kl_cov: their tokens, selected over this call's batch (None for other types)
    select = cov_selection(
        logp, old_logp, advantages, mask, cu_seqlens, cfg, adv_per_token, generator
    )
    loss, metrics, *tokens = PolicyLossFunction.apply(
        logp, old_logp, advantages, mask, cu_seqlens, ref_logp, rollout_logp, cfg, adv_per_token,
        counts["num_tokens"], counts["num_seqs"], counts["max_len"], backend, is_weights, select,
        per_token,
    )  # fmt: skip
    nonfinite = metrics[NONFINITE_LOGP : NONFINITE_ROLLOUT + 1]  # CHECKED's slots, in order
    if check_finite:  # one host sync: non-finite inputs, and the tensor counts' values
        bad = torch.cat([nonfinite, bad_count_flags(counts, metrics)]).tolist()
        raise_bad_counts(counts, bad[len(CHECKED) :])
        for name, slot in CHECKED.items():
            name = (
                "rollout_is_weights"
                if is_weights is not None and slot == NONFINITE_ROLLOUT
                else name
            )
            if k := bad[slot - NONFINITE_LOGP]:
                raise ValueError(f"{name} has {int(k)} non-finite value(s) among the valid tokens")
    named = {name: metrics[slot] for name, slot in METRIC_SLOTS.items()}
    res = PolicyLossOutput(loss, **named, num_nonfinite=nonfinite.sum())
    return PolicyLossTokenOutput(*res, per_token_outputs(*tokens, select)) if per_token else res


class PolicyLossModule(torch.nn.Module):
    """``policy_loss`` with its settings held by a module, resolved once.

    Args:
        config: the loss settings (PolicyLossConfig); None: its defaults.
        check_finite, backend: as in ``policy_loss``.
        **settings: PolicyLossConfig's fields by name, replacing config's.
    """

    def __init__(
        self,
        config: PolicyLossConfig | None = None,
        *,
        check_finite: bool = True,
        backend: str = "auto",
        **settings,
    ) -> None:
        super().__init__()
        self.config = PolicyLossConfig.resolve(config, settings)
        self.check_finite, self.backend = check_finite, backend

    def forward(
        self,
        logp: torch.Tensor,
        old_logp: torch.Tensor | None,
        advantages: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        ref_logp: torch.Tensor | None = None,
        rollout_logp: torch.Tensor | None = None,
        rollout_is_weights: torch.Tensor | None = None,
        num_tokens: Count | None = None,
        num_seqs: Count | None = None,
        max_len: Count | None = None,
        per_token: bool = False,
        generator: torch.Generator | None = None,
    ) -> PolicyLossOutput:
        return policy_loss(
            logp, old_logp, advantages, mask=mask, cu_seqlens=cu_seqlens, ref_logp=ref_logp,
            rollout_logp=rollout_logp, rollout_is_weights=rollout_is_weights,
            num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len, per_token=per_token,
            generator=generator, config=self.config, check_finite=self.check_finite,
            backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"{self.config}, check_finite={self.check_finite}, backend={self.backend!r}"
