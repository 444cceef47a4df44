"""The reference of ``papo_advantages``: a loop over the groups written to be read, in float64.

It follows the released training code for the group step (a mean and an unbiased std per group
and part) and the peers' batch steps line by line (advantages.py's module docstring names them),
with none of the fast paths' tricks: the oracle of the tests.
"""

from __future__ import annotations

import torch

from .advantages_triton import ESTIMATORS, MODES, AdvantagesOutput

# verl's masked_whiten: the constant added to the weight total and to the variance
WHITEN_EPS = 1e-8


def _group_norm_ref(x: torch.Tensor, members: list[int], eps: float, how: str):
    """x[members] normalized within the group ("std", "centre" or "loo"): (values, active);
    inactive (fewer than two members, or std <= eps): zeros."""
    vals = x[members]
    if len(members) < 2:
        return torch.zeros_like(vals), False
    mean, std = vals.mean(), vals.std()  # torch.std is the unbiased (N - 1) estimator
    if std <= eps:
        return torch.zeros_like(vals), False
    if how == "std":
        return (vals - mean) / (std + eps), True
    if how == "loo":  # r_i minus the mean of the other responses
        others = (vals.sum() - vals) / (len(members) - 1)
        return vals - others, True
    return vals - mean, True


def batch_step_ref(a, x, member, step: str, eps: float, weights=None):
    """The batch step of one part over its members across the whole batch (0 elsewhere).

    "std": a / (std of the part's rewards x over the members + eps), TRL's scale_rewards="batch"
    (no std, i.e. 0, with fewer than two members). "whiten": verl's masked_whiten of a, each
    member weighted by ``weights`` (its token count; 1 when None):
    (a - mean) / sqrt(var * W / (W - 1) + 1e-8), mean and var over W + 1e-8.
    """
    m = member.to(a.dtype)
    if step == "std":
        xs = x[member]
        std = xs.std() if xs.numel() > 1 else xs.new_zeros(())
        return a / (std + eps) * m
    w = m if weights is None else m * weights.to(a.dtype)
    total = w.sum()
    if total <= 1:  # verl refuses a whitening over one token or none
        return torch.zeros_like(a)
    mean = (w * a).sum() / (total + WHITEN_EPS)
    var = (w * (a - mean) ** 2).sum() / (total + WHITEN_EPS) * total / (total - 1)
    return (a - mean) / (var + WHITEN_EPS).sqrt() * m


def papo_advantages_ref(
    outcome: torch.Tensor,
    process: torch.Tensor | None = None,
    *,
    group_ids: torch.Tensor | None = None,
    group_offsets: torch.Tensor | None = None,
    correct: torch.Tensor | None = None,
    mode: str = "papo",
    lam: float = 1.0,
    eps: float = 1e-6,
    scale_by_std: bool = True,
    estimator: str = "grpo",
    lengths: torch.Tensor | None = None,
    reward_weights: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> AdvantagesOutput:
    """``papo_advantages`` as a loop over the groups, in ``dtype`` (float64: the reference;
    float32: that dtype's own rounding, of which the tests' tolerances are made).

    Arguments as in ``papo_advantages`` (not checked). Returns the three [N] tensors in ``dtype``
    and the statistics as 0-dim float64 tensors, computed from them (NaN where undefined).
    """
    out_kind, proc_kind = MODES[mode]
    how, step = ESTIMATORS["drgrpo" if not scale_by_std else estimator]
    if group_ids is None:
        sizes = group_offsets.diff().cpu()
        group_ids = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
    groups: dict[int, list[int]] = {}  # group id -> its responses, in the caller's order
    for i, g in enumerate(group_ids.tolist()):
        groups.setdefault(g, []).append(i)
    if correct is None:
        correct = (outcome[:, 0] if outcome.dim() == 2 else outcome) == 1
    correct = correct.cpu()
    weights = None if lengths is None else lengths.cpu().to(dtype)
    out = outcome.cpu().to(dtype)
    proc = None if process is None else process.cpu().to(dtype)
    everyone = torch.ones_like(correct)

    if estimator == "gdpo":  # each reward column normalized in its group, weighted sum, whitened
        rw = torch.ones(out.shape[1], dtype=dtype) if reward_weights is None else reward_weights
        adv_out = torch.zeros(out.shape[0], dtype=dtype)
        for k in range(out.shape[1]):
            col = out[:, k]
            for members in groups.values():
                adv_out[members] += rw[k].to(dtype) * _group_norm_ref(col, members, eps, how)[0]
        adv_out = batch_step_ref(adv_out, None, everyone, step, eps, weights)
        adv_proc, active_groups = torch.zeros_like(adv_out), 0
    else:
        if out_kind == "product":
            out = out * proc
        adv_out, adv_proc = torch.zeros_like(out), torch.zeros_like(out)
        proc_member = everyone if proc_kind == "all" else correct
        active_groups = 0
        for members in groups.values():
            if out_kind is not None:
                adv_out[members] = _group_norm_ref(out, members, eps, how)[0]
            if proc_kind is not None:
                norm_over = [i for i in members if proc_member[i]]
                a_proc, active = _group_norm_ref(proc, norm_over, eps, how)
                adv_proc[norm_over] = a_proc
                active_groups += active
        if step is not None and out_kind is not None:
            adv_out = batch_step_ref(adv_out, out, everyone, step, eps, weights)
        if step is not None and proc_kind is not None:
            adv_proc = batch_step_ref(adv_proc, proc, proc_member, step, eps, weights)
    adv = adv_out + (1.0 if mode == "prm" else lam) * adv_proc

    a64, nan = adv.double(), torch.tensor(float("nan"), dtype=torch.float64)
    c, w = a64[correct], a64[~correct]
    stats = {
        "zero_adv_frac": (adv == 0).sum().double() / max(adv.numel(), 1),
        "proc_active_frac": torch.tensor(active_groups / len(groups)) if groups else nan,
        "correct_adv_min": c.min() if c.numel() else nan,
        "correct_adv_mean": c.mean() if c.numel() else nan,
        "wrong_adv_mean": w.mean() if w.numel() else nan,
        "num_groups": torch.tensor(float(len(groups)), dtype=torch.float64),
    }
    return AdvantagesOutput(adv, adv_out, adv_proc, {k: v.double() for k, v in stats.items()})
