"""PAPO advantages: segmented group normalization of rewards, in one pass.

For one prompt's group of responses (docs/design.md, "PAPO advantages": the authors' released
code to the last detail):

    A_out  = (r_out - mean) / (std + eps)        over all responses of the group
    A_proc = (r_proc - mean_C) / (std_C + eps)   over the correct responses C only; 0 elsewhere
    A      = A_out + lam * A_proc

std is the unbiased (N-1) standard deviation. A part is *active* in a group only when it has at
least two members and std > eps; otherwise the whole group gets 0 for that part (a group of one
gets 0). ``scale_by_std=False`` centres without dividing (Dr. GRPO), for both parts, under the
same activity rule. The paper's baselines are other ways of wiring the same normalization:

    mode       outcome part            process part                weight
    papo       r_out over all          r_proc over correct only    lam
    orm        r_out over all          -                           -
    prm        -                       r_proc over all             1
    mult       r_out * r_proc over all -                           -
    fullnorm   r_out over all          r_proc over all             lam

``estimator=`` says how each part is normalized over its members (the mode says which rewards
and which members); "grpo" is the above. Per group, in the kernel: "drgrpo" centres (verl's
grpo with norm_adv_by_std_in_grpo=False, TRL's scale_rewards="none"); "rloo" subtracts the mean
of the group's other members, (r - mean) * n / (n - 1) (verl's and TRL's RLOO; a group of one
response is refused). Then a batch step over the part's members in the whole batch, in PyTorch:
"batch_std" centres and divides by the std of the part's rewards over the batch + eps (TRL's
scale_rewards="batch", whose eps is 1e-4); "reinforce_pp" centres, then whitens as verl's
masked_whiten, per token with ``lengths`` (reinforce_plus_plus_baseline); "gdpo" normalizes
each column of outcome [N, K] like grpo, sums them with weights and whitens likewise (verl's
gdpo). The activity rule holds in the group step; the whitening moves inactive groups too.

Layers: ``_papo_adv_kernel`` (one program per group) and its launcher ``papo_advantages_triton``
(advantages_triton.py), and ``papo_advantages_torch`` (vectorized segment reductions, the CPU
path) beside them -> ``papo_advantages`` (checks, grouping, dispatch). No autograd: advantages are
constants of the loss. ``papo_advantages_ref`` (advantages_ref.py) is the per-group loop written
to be read: the reference of the tests.
"""

from __future__ import annotations

import torch

from ._backend import (
    bad_values_error,
    beyond_float32,
    check_vector,
    resolve_backend,
)
from .advantages_ref import WHITEN_EPS
from .advantages_ref import papo_advantages_ref as papo_advantages_ref  # the tests' oracle
from .advantages_triton import ESTIMATORS as ESTIMATORS  # re-exported with MODES
from .advantages_triton import (
    MIN_CORRECT,
    MODES,
    N_CORRECT,
    N_WRONG,
    NUM_ADV_STATS,
    PROC_ACTIVE,
    SUM_CORRECT,
    SUM_WRONG,
    ZERO_ADV,
    AdvantagesOutput,
    estimator_settings,
    kernel_rewards,
    papo_advantages_triton,
)

Advantages = AdvantagesOutput  # the old name, kept for one release


def _stats_from_sums(sums: torch.Tensor, n: int, num_groups: torch.Tensor) -> dict:
    """sums: [NUM_ADV_STATS] float64, in the named slots. The statistics are float32, divided in
    float64 (a sum may exceed float32, its mean not)."""
    nan = torch.full_like(sums[ZERO_ADV], float("nan"))
    has_c, has_w = sums[N_CORRECT] > 0, sums[N_WRONG] > 0
    groups = num_groups.to(sums.dtype)
    stats = {
        "zero_adv_frac": sums[ZERO_ADV] / max(n, 1),
        "proc_active_frac": torch.where(groups > 0, sums[PROC_ACTIVE] / groups.clamp_min(1), nan),
        "correct_adv_min": torch.where(has_c, sums[MIN_CORRECT], nan),
        "correct_adv_mean": torch.where(
            has_c, sums[SUM_CORRECT] / sums[N_CORRECT].clamp_min(1), nan
        ),
        "wrong_adv_mean": torch.where(has_w, sums[SUM_WRONG] / sums[N_WRONG].clamp_min(1), nan),
        "num_groups": groups,
    }
    return {k: v.float() for k, v in stats.items()}


# ----------------------------------------------------------------------------- PyTorch


def _segment_norm_torch(x, w, seg, num_slots: int, eps: float, scale: str):
    """_segment_norm for every group and every part at once, ``scale`` a key of SCALES.

    x: [N, K] rewards of K parts; w: [N, K] membership (0 / 1); seg: [N] group slot.
    Returns the normalized [N, K] (0 outside members and inactive groups) and active [slots, K].
    """
    k = x.shape[1]
    flat = (seg[:, None] * k + torch.arange(k, device=seg.device)).view(-1)  # [N * K] bins

    def segment_sum(v: torch.Tensor) -> torch.Tensor:  # [N, K] -> [slots, K]
        # a 1-D index_add_ (several times faster on the CPU than index_add_ along dim 0 of [N, K])
        return v.new_zeros(num_slots * k).index_add_(0, flat, v.reshape(-1)).view(num_slots, k)

    n = segment_sum(w)
    mean = segment_sum(x * w) / n.clamp_min(1)
    d = (x - mean[seg]) * w
    std = (segment_sum(d * d) / (n - 1).clamp_min(1)).sqrt()
    active = (n >= 2) & (std > eps)  # empty slots are inactive
    if scale == "std":
        d = d / (std[seg] + eps)
    elif scale == "loo":  # minus the mean of the others: (x - mean) * n / (n - 1)
        d = d * (n / (n - 1).clamp_min(1))[seg]
    return d * active[seg], active


def stat_sums(adv: torch.Tensor, correct: torch.Tensor, proc_active: torch.Tensor) -> torch.Tensor:
    """The [NUM_ADV_STATS] float64 sums of the final [N] float32 advantages, in the named slots
    (the kernel's rows hold the same, per group)."""
    wrong, c, inf = ~correct, correct.double(), float("inf")
    slots = {
        ZERO_ADV: (adv == 0).sum(),
        PROC_ACTIVE: proc_active,
        N_CORRECT: c.sum(),
        SUM_CORRECT: (adv * c).sum(),
        MIN_CORRECT: torch.where(correct, adv, inf).amin() if adv.numel() else adv.new_tensor(inf),
        N_WRONG: wrong.sum(),
        SUM_WRONG: torch.where(wrong, adv.double(), 0.0).sum(),
    }
    return torch.stack([slots[k].double() for k in range(NUM_ADV_STATS)])


def papo_advantages_torch(out_r, proc_r, correct, seg, num_slots, lam, eps, proc_all, scale):
    """The CPU path: segment reductions with index_add_, no loop over groups, no host sync.

    Both parts are normalized in one set of reductions (a column each). Sums run in float64
    (sequential index_add_ in float32 loses ~1e-5 on 1024-response groups); results are float32.
    """
    everyone = torch.ones_like(correct, dtype=torch.float64)
    parts = [r for r in (out_r, proc_r) if r is not None]
    members = ([everyone] if out_r is not None else []) + (
        [everyone if proc_all else correct.double()] if proc_r is not None else []
    )
    x, w = torch.stack(parts, 1).double(), torch.stack(members, 1)  # [N, K]
    a, active = _segment_norm_torch(x, w, seg, num_slots, eps, scale)
    zeros = torch.zeros_like(everyone)
    adv_out = a[:, 0] if out_r is not None else zeros
    adv_proc = a[:, -1] if proc_r is not None else zeros
    adv = (adv_out + lam * adv_proc).float()
    proc_active = active[:, -1].sum() if proc_r is not None else zeros.new_zeros(())
    return adv, adv_out.float(), adv_proc.float(), stat_sums(adv, correct, proc_active)


def batch_step(a, x, member, step: str, eps: float, weights):
    """The batch step of one part ([N] group-normalized a, its rewards x, its members): see
    ``batch_step_ref``, which it computes without a host sync, in float64."""
    a, m = a.double(), member.double()
    if step == "std":
        cnt = m.sum()
        mean = (x.double() * m).sum() / cnt.clamp_min(1)
        var = (((x.double() - mean) * m) ** 2).sum() / (cnt - 1).clamp_min(1)
        return a / (torch.where(cnt > 1, var.sqrt(), 0.0) + eps) * m
    w = m if weights is None else m * weights.double()
    total = w.sum()
    mean = (w * a).sum() / (total + WHITEN_EPS)
    var = (w * (a - mean) ** 2).sum() / (total + WHITEN_EPS) * total / (total - 1).clamp_min(1e-300)
    return torch.where(total > 1, (a - mean) / (var + WHITEN_EPS).sqrt() * m, 0.0)


# ----------------------------------------------------------------------------- API


def _check_reward(name: str, t: torch.Tensor, n: int | None) -> None:
    """Shape and dtype; the values are checked by ``_check_values`` in the call's one sync."""
    check_vector(name, t, n)
    if t.is_complex():
        raise ValueError(f"{name} must hold real numbers, got {t.dtype}")


def _check_values(rewards: dict, outputs: dict, lam: float, extra=()) -> None:
    """One host sync for every value check of a call. Rewards (and the product "mult" normalizes)
    must be finite and within float32's range: the advantages are float32, as is the kernel's
    math, so both backends refuse what the Triton one cannot read. Then the outputs must be
    finite: centred advantages (scale_by_std=False) or lam * process_adv can exceed float32 even
    for rewards within it. ``extra``: (flag, error) pairs of other checks, error() raised when its
    0-dim bool flag is set."""
    rewards = {k: t for k, t in rewards.items() if t is not None and t.is_floating_point()}
    flags = [beyond_float32(t).any() for t in rewards.values()] + [f for f, _ in extra]
    flags += [~torch.isfinite(t).all() for t in outputs.values()]
    bad = torch.stack(flags).tolist()
    for (name, t), b in zip(rewards.items(), bad, strict=False):
        if b:
            raise bad_values_error(name, t, beyond_float32(t))
    for (_, error), b in zip(extra, bad[len(rewards) :], strict=False):
        if b:
            raise error()
    bad = bad[len(rewards) + len(extra) :]
    for (name, t), b in zip(outputs.items(), bad, strict=True):
        if b:
            i = int((~torch.isfinite(t)).nonzero()[0])
            raise ValueError(
                f"advantages overflow float32 at index {i} of {name}: rewards this far apart "
                f"(centred, scale_by_std=False) or lam = {lam} times process_adv give values "
                "float32 cannot hold"
            )


def _groups_from_offsets(group_offsets: torch.Tensor, n: int):
    check_vector("group_offsets", group_offsets)
    if group_offsets.is_floating_point() or group_offsets.dtype == torch.bool:
        raise ValueError(f"group_offsets must be an integer tensor, got {group_offsets.dtype}")
    offs = group_offsets.long()
    if offs.numel() == 0 or int(offs[0]) != 0:
        raise ValueError("group_offsets must start at 0 (like cu_seqlens: [G + 1] boundaries)")
    if int(offs[-1]) != n:
        raise ValueError(f"group_offsets must end at N = {n} (the number of responses), "
                         f"got {int(offs[-1])}")  # fmt: skip
    sizes = offs.diff()
    if bool((sizes <= 0).any()):
        g = int((sizes <= 0).nonzero()[0])
        raise ValueError(
            f"group_offsets must be strictly increasing: group {g} is "
            f"{'empty' if int(sizes[g]) == 0 else 'negative'} "
            f"(offsets[{g}] = {int(offs[g])}, offsets[{g + 1}] = {int(offs[g + 1])})"
        )
    num_groups = offs.numel() - 1
    seg = torch.repeat_interleave(
        torch.arange(num_groups, device=offs.device), sizes, output_size=n
    )
    return seg, num_groups, None, offs, offs.new_tensor(num_groups)


def _groups_from_ids(group_ids: torch.Tensor, n: int, for_kernel: bool):
    """Sort ids into contiguous segments without a host sync (N bounds the group count).

    Returns what the chosen path needs: the kernel walks PERM between OFFSETS, the PyTorch path
    reduces over a dense slot per response (seg).
    """
    check_vector("group_ids", group_ids, n)
    if group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    sorted_ids, perm = torch.sort(group_ids, stable=True)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    slot_sorted = starts.cumsum(0) - 1  # [N] dense group index, sorted order
    num_groups = slot_sorted[-1] + 1
    if not for_kernel:
        return (
            torch.empty_like(slot_sorted).scatter_(0, perm, slot_sorted),
            n,
            None,
            None,
            num_groups,
        )
    positions = torch.arange(n, device=group_ids.device)
    offsets = torch.full((n + 1,), n, dtype=torch.long, device=group_ids.device)
    offsets.scatter_reduce_(0, slot_sorted, positions, reduce="amin")  # start of each group
    return None, n, perm, offsets, num_groups


def _lone_response_check(group_ids, group_offsets):
    """(flag, error) for ``_check_values``: a group of a single response, which leave-one-out
    cannot score (there is no other response to be its baseline)."""
    if group_offsets is not None:
        lone = group_offsets.long().diff() == 1

        def error():
            g = int(lone.nonzero()[0])
            return ValueError(f"estimator='rloo' needs at least 2 responses per group: group {g} "
                              f"(group_offsets[{g}] = {int(group_offsets[g])}) has 1")  # fmt: skip

        return lone.any(), error
    ids, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    lone = counts[inverse] == 1  # [N]

    def error():
        i = int(lone.nonzero()[0])
        return ValueError(f"estimator='rloo' needs at least 2 responses per group: group id "
                          f"{int(group_ids[i])} (response {i}) has 1")  # fmt: skip

    return lone.any(), error


def papo_advantages(
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
    reward_weights: list[float] | None = None,
    backend: str = "auto",
) -> AdvantagesOutput:
    """PAPO advantages (or a baseline's) for N responses in groups, in one segmented pass.

    Args:
        outcome: [N] outcome rewards (verifier; may be shaped), any real dtype; [N, K] reward
            columns with ``estimator="gdpo"``.
        process: [N] rubric scores (0 / 0.5 / 1). Needed by every mode but ``"orm"``. Scores of
            wrong responses are ignored in ``"papo"`` mode.
        group_ids: [N] integers naming each response's prompt: any values, any order, ragged.
        group_offsets: [G + 1] boundaries of contiguous groups (like cu_seqlens). Give exactly one
            of group_ids / group_offsets.
        correct: [N] bool correctness; default ``outcome == 1`` (pass it when outcome is shaped;
            with gdpo's columns the default reads the first one).
        mode: "papo", "orm", "prm", "mult" or "fullnorm" (see the module docstring).
        lam: weight of the process part in "papo" and "fullnorm".
        eps: std threshold and denominator epsilon of the released code.
        scale_by_std: False centres without dividing by std (Dr. GRPO), both parts; the same as
            ``estimator="drgrpo"``.
        estimator: how each part is normalized (the module docstring's table): "grpo", "drgrpo",
            "rloo", "batch_std", "reinforce_pp" or "gdpo".
        lengths: [N] token counts of the responses: weigh the batch whitening of
            "reinforce_pp" and "gdpo" per token, as verl does (default: per response).
        reward_weights: K weights of gdpo's columns (default: 1 each).
        backend: "auto" (Triton on CUDA, PyTorch on CPU), "torch" or "triton".

    Returns:
        AdvantagesOutput with [N] float32 tensors in the caller's order and 0-dim stats.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    how, step, col_weights = estimator_settings(
        estimator, scale_by_std, mode, outcome, lengths, reward_weights
    )
    out_kind, proc_kind = MODES[mode]
    columns = outcome.unbind(1) if col_weights is not None else (outcome,)
    for k, col in enumerate(columns):
        _check_reward("outcome" if col_weights is None else f"outcome[:, {k}]", col, None)
    n = columns[0].numel()
    if process is not None:
        _check_reward("process", process, n)
    elif proc_kind is not None or out_kind == "product":
        raise ValueError(f"mode={mode!r} needs process rewards (process=None given)")
    if correct is None:
        correct = columns[0] == 1
    else:
        check_vector("correct", correct, n)
        if correct.dtype != torch.bool:
            raise ValueError(f"correct must be a bool tensor, got {correct.dtype}")
    if lengths is not None:
        check_vector("lengths", lengths, n)
        if lengths.is_complex() or lengths.dtype == torch.bool:
            raise ValueError(f"lengths must hold real numbers, got {lengths.dtype}")
    if (group_ids is None) == (group_offsets is None):
        raise ValueError("give exactly one of group_ids ([N] ids) or group_offsets ([G + 1])")
    if not (lam == lam and abs(lam) < float("inf")) or not eps >= 0:
        raise ValueError(f"lam must be finite and eps >= 0, got lam={lam}, eps={eps}")
    which = resolve_backend(backend, outcome, process, correct, group_ids, group_offsets, lengths)

    if group_offsets is not None:
        seg, num_slots, perm, offsets, num_groups = _groups_from_offsets(group_offsets, n)
    elif n == 0:
        check_vector("group_ids", group_ids, 0)
        seg, num_slots, perm, offsets = group_ids.long(), 0, None, group_ids.new_zeros(1).long()
        num_groups = offsets[0]
    else:
        seg, num_slots, perm, offsets, num_groups = _groups_from_ids(
            group_ids, n, for_kernel=which == "triton"
        )

    lam = 1.0 if mode == "prm" else float(lam)
    correct = correct.contiguous()

    def group_pass(column):  # one launch (or one set of reductions) over every group
        out_r, proc_r, proc_all = kernel_rewards(mode, column, process)
        if which == "triton" and n > 0:
            return (out_r, proc_r, proc_all), papo_advantages_triton(
                out_r.contiguous() if out_r is not None else None,
                proc_r.contiguous() if proc_r is not None else None,
                correct, perm, offsets, lam, eps, proc_all, how,
            )  # fmt: skip
        return (out_r, proc_r, proc_all), papo_advantages_torch(
            out_r, proc_r, correct, seg, num_slots, lam, eps, proc_all, how
        )

    (out_r, proc_r, proc_all), (adv, adv_out, adv_proc, sums) = group_pass(columns[0])
    if col_weights is not None:  # gdpo: the weighted sum of the columns' group advantages
        adv_out = adv_out.double() * col_weights[0]
        for col, w in zip(columns[1:], col_weights[1:], strict=True):
            adv_out = adv_out + w * group_pass(col)[1][1].double()
    if step is not None:  # the batch step, per part over its members (a few [N] ops)
        everyone = torch.ones_like(correct)
        if out_r is not None:
            adv_out = batch_step(adv_out, out_r, everyone, step, eps, lengths)
        if proc_r is not None:
            member = everyone if proc_all else correct
            adv_proc = batch_step(adv_proc, proc_r, member, step, eps, lengths)
        adv = (adv_out + lam * adv_proc.double()).float()
        adv_out, adv_proc = adv_out.float(), adv_proc.float()
        sums = stat_sums(adv, correct, sums[PROC_ACTIVE])
    rewards = {"outcome": outcome if col_weights is None else None, "process": process}
    rewards.update({f"outcome[:, {k}]": c for k, c in enumerate(columns) if col_weights})
    if out_kind == "product":
        rewards["outcome * process"] = out_r
    extra = []
    if lengths is not None and lengths.numel():
        extra.append(((lengths < 0).any(), lambda: ValueError("lengths must be >= 0 (tokens)")))
    if how == "loo" and n > 0:
        extra.append(_lone_response_check(group_ids, group_offsets))
    outputs = {"advantages": adv, "outcome_adv": adv_out, "process_adv": adv_proc}
    _check_values(rewards, outputs, lam, extra)
    return AdvantagesOutput(adv, adv_out, adv_proc, _stats_from_sums(sums, n, num_groups))


def token_advantages(
    advantages: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Spread one advantage per response over its tokens.

    Args:
        advantages: [B] per-response advantages.
        mask: [B, L] token mask of the padded layout -> returns [B, L], 0 where mask is 0.
        cu_seqlens: [B + 1] boundaries of the packed layout -> returns [T], T = cu_seqlens[-1].
    """
    check_vector("advantages", advantages)
    if (mask is None) == (cu_seqlens is None):
        raise ValueError("give exactly one of mask ([B, L]) or cu_seqlens ([B + 1])")
    b = advantages.numel()
    if mask is not None:
        if mask.dim() != 2 or mask.shape[0] != b:
            raise ValueError(f"mask must be [B, L] with B = {b}, got shape {tuple(mask.shape)}")
        return torch.where(mask.bool(), advantages[:, None], advantages.new_zeros(()))
    check_vector("cu_seqlens", cu_seqlens, b + 1)
    lengths = cu_seqlens.long().diff()
    if bool((lengths < 0).any()) or int(cu_seqlens[0]) != 0:
        raise ValueError("cu_seqlens must start at 0 and never decrease")
    return torch.repeat_interleave(advantages, lengths)
