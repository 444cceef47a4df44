"""The argument checks of ``policy_loss`` (kernels/policy_loss.py), before any pass over the values.

Shapes, dtypes, layouts and the caller's counts are checked here; finiteness is counted in the
loss's own token pass, and a tensor count's value is read in that call's one host sync
(``bad_count_flags`` / ``raise_bad_counts``).
"""

from __future__ import annotations

import math

import torch

from ._backend import check_float
from .policy_loss_finalize import valid_count
from .policy_loss_torch import advantages_per_token, check_rollout_weights

Count = int | float | torch.Tensor


def _check_like(name: str, t: torch.Tensor | None, logp: torch.Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_float(name, t)
    if t.shape != logp.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected logp's {tuple(logp.shape)}")


def _check_count(name: str, value: Count | None) -> None:
    """A number is checked here; a tensor's value in the call's one host sync (``valid_count``)."""
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(
                f"{name} must be a number or a 1-element real tensor, got a {value.dtype} tensor "
                f"of shape {tuple(value.shape)}"
            )
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise count_error(name, value)


def count_error(name: str, value: Count) -> ValueError:
    shown = value.item() if isinstance(value, torch.Tensor) else value
    return ValueError(f"{name} must be a positive finite number, got {shown!r}")


def bad_count_flags(counts: dict, like: torch.Tensor) -> torch.Tensor:
    """[k] flags in ``like``'s dtype and device, nonzero where the caller's k-th tensor count is
    not > 0 and finite. No host sync: they are read with a sync the call makes anyway, then
    handed to ``raise_bad_counts``."""
    flags = [(~valid_count(v)).reshape(1) for v in counts.values() if isinstance(v, torch.Tensor)]
    return torch.cat(flags).to(like) if flags else like.new_zeros(0)


def raise_bad_counts(counts: dict, flags: list) -> None:
    """The error of the first tensor count whose flag (``bad_count_flags``, read) is set."""
    tensors = [(k, v) for k, v in counts.items() if isinstance(v, torch.Tensor)]
    for (name, value), bad in zip(tensors, flags, strict=True):
        if bad:
            raise count_error(name, value)


def check_inputs(
    logp, old_logp, advantages, mask, cu_seqlens, ref_logp, rollout_logp, cfg, counts, verify_cu,
    rollout_is_weights=None,
) -> tuple[bool, torch.Tensor | None]:  # fmt: skip
    """Every argument check of ``policy_loss`` (no pass over the values; one sync for cu_seqlens
    when ``verify_cu``). Finiteness is counted in the loss's own pass. The settings in ``cfg`` are
    checked where they are written, when the PolicyLossConfig is built.

    Returns whether the advantages are per token (``advantages_per_token``, in this layout), and
    the rollout weights as the token pass reads them (``check_rollout_weights``; None without).
    """
    if not isinstance(logp, torch.Tensor):
        raise ValueError(f"logp must be a torch.Tensor, got {type(logp).__name__}")
    check_float("logp", logp)
    if (mask is None) == (cu_seqlens is None):
        raise ValueError(
            "pass exactly one of mask (padded logp [B, L]) and cu_seqlens (packed logp [T]), got "
            + ("both" if mask is not None else "neither")
        )
    if mask is not None:
        if logp.dim() != 2:
            raise ValueError(f"logp must be [B, L] with mask, got shape {tuple(logp.shape)}")
        if not isinstance(mask, torch.Tensor) or mask.shape != logp.shape:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask has shape {shape}, expected logp's {tuple(logp.shape)}")
        b = logp.shape[0]
    else:
        if logp.dim() != 1:
            raise ValueError(f"logp must be [T] with cu_seqlens, got shape {tuple(logp.shape)}")
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
            raise ValueError("cu_seqlens must be a 1-D integer tensor [B + 1]")
        if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.numel() < 2:
            raise ValueError(
                f"cu_seqlens must be int32/int64 with B + 1 >= 2 entries, got {cu_seqlens.dtype} "
                f"with {cu_seqlens.numel()}"
            )
        b = cu_seqlens.numel() - 1
        if verify_cu:  # one host sync; skipped with check_finite=False on CUDA
            cu = cu_seqlens.tolist()
            if (
                cu[0] != 0
                or cu[-1] != logp.numel()
                or any(x > y for x, y in zip(cu, cu[1:], strict=False))
            ):
                raise ValueError(
                    f"cu_seqlens must rise from 0 to len(logp) = {logp.numel()}, got "
                    f"{cu if len(cu) <= 8 else cu[:4] + ['...'] + cu[-3:]}"
                )
    if b == 0:
        raise ValueError("logp holds no sequence (B = 0)")
    if not isinstance(advantages, torch.Tensor):
        raise ValueError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    check_float("advantages", advantages)
    per_token = advantages_per_token(advantages, logp, b)
    if advantages.shape != (logp.shape if per_token else (b,)):
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}, expected [{b}] (per sequence) or "
            f"logp's {tuple(logp.shape)} (per token)"
        )
    _check_like("old_logp", old_logp, logp)
    _check_like("ref_logp", ref_logp, logp)
    _check_like("rollout_logp", rollout_logp, logp)
    if cfg.uses_ref and ref_logp is None:
        raise ValueError(f"ref_logp is required when beta > 0 (beta = {cfg.beta})")
    if cfg.rollout_rs is not None and rollout_logp is None and rollout_is_weights is None:
        raise ValueError(f"rollout_rs={cfg.rollout_rs!r} needs rollout_logp")
    is_weights = check_rollout_weights(rollout_is_weights, logp, b, rollout_logp, cfg)
    for name, value in counts.items():
        _check_count(name, value)
    return per_token, is_weights
