"""papo_advantages' estimators (estimator=): against the float64 reference for every mode, both
backends and input dtypes; hand-computed RLOO; TRL's own code paths (RLOO, scale_rewards="none"
and "batch", reproduced from the installed trl 1.16 source with its own ``nanstd``); the
combinations refused; whole-group splits; the trainer's setting. verl's functions are matched in
test_verl_estimators.py (its own environment)."""

from __future__ import annotations

import pytest
import torch
from helpers import F64_ATOL, assert_close, assert_close_to_ref, data_scale, ref_error

from papo_fast.config import AdvantageConfig, ConfigError, load_config
from papo_fast.kernels.advantages import MODES, papo_advantages, papo_advantages_ref
from papo_fast.kernels.advantages_triton import ESTIMATORS

BACKENDS = ["torch", "triton"]
GROUP_LEVEL = ["grpo", "drgrpo", "rloo"]  # each group's advantages depend on that group only


def rewards(n: int, seed: int, groups: int, k: int = 0):
    """Fresh random data: ragged groups (ids in any order, each group >= 2 responses), shaped
    outcome rewards (or k columns), rubric tiers, correctness, token counts."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.arange(groups).repeat(2), torch.randint(0, groups, (n - 2 * groups,),
                                                                   generator=g)])  # fmt: skip
    ids = ids[torch.randperm(n, generator=g)] * 7 + 3  # any values
    correct = torch.rand(n, generator=g) < 0.5
    shape = (n, k) if k else (n,)
    outcome = torch.rand(shape, generator=g, dtype=torch.float64) + (correct[:, None] if k else
                                                                    correct)  # fmt: skip
    tiers = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    process = tiers[torch.randint(0, 3, (n,), generator=g)] + 0.01 * torch.rand(n, generator=g)
    lengths = torch.randint(1, 300, (n,), generator=g)
    return outcome, process, correct, ids, lengths


def check_against_ref(res, kw, outcome, process, dtype, msg):
    """Every output against the float64 reference, tolerance from the float32 reference's own
    error (assert_close_to_ref) at the advantages' scale; the statistics likewise (zero_adv_frac
    and num_groups are counts: exact)."""
    want = papo_advantages_ref(outcome, process, **kw)
    same = papo_advantages_ref(outcome, process, dtype=torch.float32, **kw)
    for name in ("advantages", "outcome_adv", "process_adv"):
        ours = getattr(res, name)
        assert ours.dtype == torch.float32
        assert_close_to_ref(ours, getattr(want, name), getattr(same, name), msg=f"{msg} {name}")
    err, scale = ref_error(same.advantages, want.advantages), data_scale(want.advantages)
    for key, value in want.stats.items():
        exact = key in ("zero_adv_frac", "num_groups", "proc_active_frac")
        got = res.stats[key].double()
        if exact:  # counts and shares of counts, rounded once to float32
            assert_close(got, value, atol=float(value.abs()) * 2**-24 + F64_ATOL, msg=key)
        else:
            assert_close_to_ref(got, value, same.stats[key], scale=scale, ref_err=err, msg=key)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("estimator", [e for e in ESTIMATORS if e != "gdpo"])
def test_estimator_every_mode_against_ref(estimator, dtype, backend):
    outcome, process, correct, ids, lengths = rewards(203, seed=len(estimator), groups=23)
    outcome, process = outcome.to(dtype), process.to(dtype)  # the reference reads the same values
    for mode in MODES:
        kw = dict(group_ids=ids, correct=correct, mode=mode, lam=0.7, estimator=estimator)
        if estimator == "reinforce_pp":
            kw["lengths"] = lengths
        res = papo_advantages(outcome, process, backend=backend, **kw)
        check_against_ref(res, kw, outcome, process, dtype, f"{estimator} {mode} {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighted", [False, True])
def test_gdpo_columns_against_ref(backend, weighted):
    outcome, _, correct, ids, lengths = rewards(157, seed=5, groups=19, k=3)
    kw = dict(group_ids=ids, correct=correct, mode="orm", estimator="gdpo")
    if weighted:
        kw.update(lengths=lengths, reward_weights=[1.0, 0.25, 2.0])
    res = papo_advantages(outcome.float(), backend=backend, **kw)
    ref_kw = dict(kw, reward_weights=torch.tensor(kw.get("reward_weights", [1.0] * 3)))
    check_against_ref(res, ref_kw, outcome.float(), None, torch.float32, f"gdpo {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rloo_hand_computed(backend):
    # one group of 4, outcome [1, 0, 1, 1]: the others' means are [2/3, 1, 2/3, 2/3], so
    # A = [1/3, -1, 1/3, 1/3] (the same as (r - 0.75) * 4 / 3); a group of 2, [0.2, 0.6]: each
    # is the other's baseline, A = [-0.4, 0.4].
    out = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.2, 0.6], dtype=torch.float64)
    offsets = torch.tensor([0, 4, 6])
    want = torch.tensor([1 / 3, -1.0, 1 / 3, 1 / 3, -0.4, 0.4], dtype=torch.float64)
    kw = dict(group_offsets=offsets, mode="orm", estimator="rloo")
    assert_close(papo_advantages_ref(out, **kw).advantages, want, atol=F64_ATOL)
    res = papo_advantages(out, backend=backend, **kw)
    same = papo_advantages_ref(out, dtype=torch.float32, **kw)
    assert_close_to_ref(res.advantages, want, same.advantages)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rloo_group_of_one_is_refused(backend):
    out = torch.tensor([1.0, 0.0, 1.0, 0.5])
    with pytest.raises(ValueError, match=r"rloo.*group 1 \(group_offsets\[1\] = 2\) has 1"):
        papo_advantages(out, group_offsets=torch.tensor([0, 2, 3, 4]), mode="orm",
                        estimator="rloo", backend=backend)  # fmt: skip
    with pytest.raises(ValueError, match=r"rloo.*group id 9 \(response 2\) has 1"):
        papo_advantages(out, group_ids=torch.tensor([4, 4, 9, 4]), mode="orm",
                        estimator="rloo", backend=backend)  # fmt: skip


def test_scale_by_std_false_is_drgrpo():
    outcome, process, correct, ids, _ = rewards(91, seed=3, groups=11)
    kw = dict(group_ids=ids, correct=correct, backend="torch")
    a = papo_advantages(outcome, process, scale_by_std=False, **kw)
    b = papo_advantages(outcome, process, estimator="drgrpo", **kw)
    assert torch.equal(a.advantages, b.advantages)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(estimator="ppo"), "estimator must be one of"),
        (dict(estimator="rloo", scale_by_std=False), "scale_by_std=False is estimator='drgrpo'"),
        (dict(estimator="grpo", lengths=torch.ones(6)), "lengths weigh the batch whitening"),
        (dict(estimator="rloo", reward_weights=[1.0]), "reward_weights weigh the reward columns"),
        (dict(estimator="gdpo"), "needs mode='orm', got mode='papo'"),
        (dict(estimator="gdpo", mode="orm"), r"needs outcome as \[N, K\] reward columns"),
        (dict(estimator="reinforce_pp", lengths=-torch.ones(6)), "lengths must be >= 0"),
    ],
)
def test_estimator_combinations_refused(kw, match):
    out, proc = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0]), torch.rand(6)
    with pytest.raises(ValueError, match=match):
        papo_advantages(out, proc, group_offsets=torch.tensor([0, 3, 6]), **kw)


def test_gdpo_weights_must_match_columns():
    with pytest.raises(ValueError, match="reward_weights must be 2 finite numbers"):
        papo_advantages(torch.rand(6, 2), group_offsets=torch.tensor([0, 3, 6]), mode="orm",
                        estimator="gdpo", reward_weights=[1.0])  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", GROUP_LEVEL)
def test_group_level_estimators_split_by_whole_groups(estimator, backend):
    """A batch split into micro-batches of whole groups gives each response the advantage the
    whole batch gives it (the batch-level estimators need the whole batch, by definition)."""
    outcome, process, correct, _, _ = rewards(120, seed=9, groups=15)
    offsets = torch.tensor([0, 5, 13, 20, 31, 40, 52, 60, 71, 80, 88, 97, 104, 112, 120])
    kw = dict(mode="papo", estimator=estimator, backend=backend)
    full = papo_advantages(outcome, process, group_offsets=offsets, correct=correct, **kw)
    parts = []
    for lo, hi in ((0, 5), (5, 9), (9, 14)):
        o = offsets[lo : hi + 1]
        s = slice(int(o[0]), int(o[-1]))
        parts.append(papo_advantages(outcome[s], process[s], group_offsets=o - o[0],
                                     correct=correct[s], **kw).advantages)  # fmt: skip
    assert torch.equal(torch.cat(parts), full.advantages)


# ---------------------------------------------------------------- TRL 1.16's own lines


def trl_group_view(outcome, num_generations):
    return outcome.float().view(-1, num_generations)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_trl_rloo_and_grpo_scale_rewards(backend):
    """TRL's advantage lines, reproduced from trl/trainer/rloo_trainer.py and grpo_trainer.py
    (_generate_and_score_completions; one reward function, no unscorable rows, so the nan-aware
    reductions reduce to plain ones) with TRL's own ``nanstd``: RLOO's leave-one-out baseline,
    GRPO's scale_rewards="none" (Dr. GRPO) and "batch" (group mean, batch std + 1e-4). TRL's
    groups are num_generations consecutive rows."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    nanstd = trl_utils.nanstd
    g, num_gen = torch.Generator().manual_seed(11), 6
    rewards_ = torch.rand(20 * num_gen, generator=g) + (torch.rand(20 * num_gen, generator=g) < 0.5)
    offsets = torch.arange(0, rewards_.numel() + 1, num_gen)
    grouped = trl_group_view(rewards_, num_gen)
    # RLOO (rloo_trainer.py)
    counts = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    baselines = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (counts - 1)
    trl_rloo = rewards_ - baselines.view(-1)
    # GRPO (grpo_trainer.py, multi_objective_aggregation="sum_then_normalize")
    mean_grouped = torch.nanmean(grouped, dim=1).repeat_interleave(num_gen, dim=0)
    trl_none = rewards_ - mean_grouped
    trl_batch = (rewards_ - mean_grouped) / (nanstd(rewards_).expand_as(rewards_) + 1e-4)

    kw = dict(group_offsets=offsets, mode="orm", backend=backend)
    for estimator, eps, want in (
        ("rloo", 1e-6, trl_rloo),
        ("drgrpo", 1e-6, trl_none),
        ("batch_std", 1e-4, trl_batch),
    ):
        ours = papo_advantages(rewards_, estimator=estimator, eps=eps, **kw).advantages
        ref64 = papo_advantages_ref(rewards_, group_offsets=offsets, mode="orm",
                                    estimator=estimator, eps=eps).advantages  # fmt: skip
        # TRL computes in float32: both sides are within twice its own error of float64
        assert_close_to_ref(ours, ref64, want, msg=f"{estimator} vs TRL")
        assert_close_to_ref(want, ref64, want, msg=f"TRL {estimator} vs float64")


# ---------------------------------------------------------------- the trainer's setting


def test_advantage_config_estimator(tmp_path):
    assert AdvantageConfig().estimator == "grpo"
    path = tmp_path / "c.yaml"
    path.write_text("advantage:\n  estimator: rloo\n")
    assert load_config(path).advantage.estimator == "rloo"
    path.write_text("advantage:\n  estimator: ppo\n")
    with pytest.raises(ConfigError, match=r"advantage.estimator must be one of"):
        load_config(path)


def test_trl_integration_passes_the_estimator():
    """PAPOTrainer's gathered reward table gets the configured estimator (a one-line
    pass-through): RLOO there equals papo_advantages' RLOO, not GRPO's."""
    trl_integration = pytest.importorskip("papo_fast.integrations.trl")
    g = torch.Generator().manual_seed(4)
    outcome = torch.rand(24, generator=g, dtype=torch.float64)
    correct = outcome > 0.5
    table = torch.stack([outcome, torch.zeros(24, dtype=torch.float64), correct.double()], 1)
    cfg = AdvantageConfig(mode="orm", estimator="rloo")
    adv, _ = trl_integration.table_advantages(table, 4, 24, cfg, {"outcome": "o"})
    want = papo_advantages(outcome, group_offsets=torch.arange(0, 25, 4), correct=correct,
                           mode="orm", estimator="rloo")  # fmt: skip
    assert torch.equal(adv.advantages, want.advantages)
