"""papo_fast's verl plugin through verl 0.9.1's own registries (CPU).

Runs in its own virtual environment (.ci/run's verl group); elsewhere the module is skipped.
- the plugin loads through the ``verl.plugins`` entry point in a fresh process;
- ``papo`` (via ``get_adv_estimator_fn``) on verl-shaped batches: string uids, shuffled rows,
  each reward on its response's last valid token: ``orm`` mode against verl's ``grpo``, every
  mode against ``papo_advantages``;
- the ``papo_fast`` policy loss (via ``get_policy_loss_fn``) against verl's ``vanilla``, loss and
  gradient, for each aggregation, with two data-parallel ranks emulated by verl's
  ``global_batch_info``.
The trainer glue and the reward path are tests/test_verl_trainer.py's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch

pytest.importorskip("verl")

from helpers import F64_ATOL, assert_close, assert_close_to_ref, ref_error  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

from papo_fast.integrations import verl as papo_verl  # noqa: E402
from papo_fast.integrations.verl_fields import fields_from_rows, handing_over  # noqa: E402
from papo_fast.kernels.advantages import MODES, papo_advantages  # noqa: E402

pytestmark = pytest.mark.verl

P, G, L = 24, 8, 13  # prompts, responses per prompt, padded response length


def verl_batch(seed: int = 0, shaped: bool = False) -> dict:
    """A verl-shaped batch: uid strings, rows shuffled, right-padded response masks, the outcome
    on each response's last valid token, the correctness and rubric score compute_score gives."""
    g = torch.Generator().manual_seed(seed)
    n = P * G
    uids = np.repeat(np.array([str(uuid.UUID(int=seed * 1000 + i + 1)) for i in range(P)]), G)
    perm = torch.randperm(n, generator=g).numpy()
    uids = uids[perm].astype(object)
    lengths = torch.randint(1, L + 1, (n,), generator=g)
    mask = (torch.arange(L)[None, :] < lengths[:, None]).float()  # [B, L]
    correct = torch.rand(n, generator=g) < 0.5
    outcome = correct.float()
    if shaped:  # an overlong-style penalty on top of the binary reward
        outcome = outcome - 0.3 * torch.rand(n, generator=g)
    tiers = torch.tensor([0.0, 0.5, 1.0])
    process = torch.where(correct, tiers[torch.randint(0, 3, (n,), generator=g)], 0.0)
    rewards = torch.zeros(n, L)
    rewards[torch.arange(n), lengths - 1] = outcome
    return dict(uids=uids, mask=mask, rewards=rewards, outcome=outcome, correct=correct,
                process=process)  # fmt: skip


def algorithm(**papo) -> object:
    return OmegaConf.create({"adv_estimator": "papo", "norm_adv_by_std_in_grpo": True,
                             "papo": papo})  # fmt: skip


def handed(b: dict):
    infos = [{"score": float(o), "acc": float(c), "papo_process": float(p)}
             for o, c, p in zip(b["outcome"], b["correct"], b["process"], strict=True)]  # fmt: skip
    return handing_over(fields_from_rows(b["uids"], infos))


# ----------------------------------------------------------------------------- plugin


def test_plugin_loads_through_entry_point_in_a_fresh_process():
    probe = (
        "from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY as A, "
        "POLICY_LOSS_REGISTRY as L\n"
        "from verl.trainer.ppo.v1 import trainer_base as t\n"
        "print('papo' in A, 'papo_fast' in L, 'papo_sync' in t.TRAINER_REGISTRY)\n"
    )
    env = dict(os.environ)
    env.pop("VERL_USE_EXTERNAL_MODULES", None)
    env.pop("VERL_USE_EXTERNAL_PLUGINS", None)
    run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-3:] == ["True", "True", "True"]
    # the same process with verl's plugin discovery off: nothing of ours is registered, so it
    # was the entry point that loaded the plugin above
    env["VERL_USE_EXTERNAL_PLUGINS"] = "none"
    run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-3:] == ["False", "False", "False"]


# ----------------------------------------------------------------------------- estimator


@pytest.mark.parametrize("shaped", [False, True], ids=["binary", "shaped"])
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_papo_orm_mode_matches_verl_grpo(shaped, scale_by_std):
    b = verl_batch(seed=1, shaped=shaped)
    cfg = OmegaConf.create({"adv_estimator": "papo", "norm_adv_by_std_in_grpo": scale_by_std,
                            "papo": {"mode": "orm"}})  # fmt: skip
    ours, returns = get_adv_estimator_fn("papo")(
        token_level_rewards=b["rewards"], response_mask=b["mask"], index=b["uids"], config=cfg
    )
    grpo = get_adv_estimator_fn("grpo")
    kw = dict(response_mask=b["mask"], index=b["uids"], norm_adv_by_std_in_grpo=scale_by_std)
    theirs, _ = grpo(token_level_rewards=b["rewards"], **kw)
    theirs64, _ = grpo(token_level_rewards=b["rewards"].double(), response_mask=b["mask"].double(),
                       index=b["uids"], norm_adv_by_std_in_grpo=scale_by_std)  # fmt: skip
    assert ours.dtype == theirs.dtype and torch.equal(ours, returns)
    assert torch.equal(ours[b["mask"] == 0], torch.zeros_like(ours[b["mask"] == 0]))
    # Not bitwise: papo_advantages sums in float64 and rounds once, verl's grpo rounds each
    # float32 step; both are held to float64 (verl's own formula), ours within twice verl's
    # float32 error plus 4 float32 ulps of the advantages' scale.
    assert_close_to_ref(ours, theirs64, theirs, msg="papo orm vs grpo")
    assert ref_error(ours, theirs64) <= ref_error(theirs, theirs64)  # never less accurate


@pytest.mark.parametrize("mode", sorted(MODES))
def test_papo_estimator_equals_papo_advantages(mode):
    b = verl_batch(seed=2)
    with handed(b) as fields:
        adv, _ = get_adv_estimator_fn("papo")(
            token_level_rewards=b["rewards"], response_mask=b["mask"], index=b["uids"],
            config=algorithm(mode=mode, lam=0.7),
        )  # fmt: skip
    _, gid = np.unique(b["uids"].astype(str), return_inverse=True)
    want = papo_advantages(b["outcome"], b["process"], group_ids=torch.from_numpy(gid),
                           correct=b["correct"], mode=mode, lam=0.7)  # fmt: skip
    assert torch.equal(adv, want.advantages[:, None] * b["mask"])
    assert fields.stats["num_groups"] == P  # the statistics reach the trainer's metrics


def test_papo_estimator_without_process_score_names_the_fix():
    b = verl_batch(seed=3)
    with pytest.raises(ValueError, match="papo_process.*papo_sync"):
        get_adv_estimator_fn("papo")(token_level_rewards=b["rewards"], response_mask=b["mask"],
                                     index=b["uids"], config=algorithm(mode="papo"))  # fmt: skip


def test_papo_estimator_refuses_rows_other_than_those_read():
    b = verl_batch(seed=4)
    with handed(b), pytest.raises(ValueError, match="reordered or filtered"):
        get_adv_estimator_fn("papo")(token_level_rewards=b["rewards"], response_mask=b["mask"],
                                     index=b["uids"][::-1].copy(), config=algorithm())  # fmt: skip


def test_papo_settings_name_the_bad_key():
    b = verl_batch(seed=5)
    for bad, match in [({"lamda": 1.0}, r"algorithm\.papo\.lamda"),
                       ({"mode": "grpo"}, r"algorithm\.papo\.mode")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            get_adv_estimator_fn("papo")(token_level_rewards=b["rewards"],
                                         response_mask=b["mask"], index=b["uids"],
                                         config=algorithm(**bad))  # fmt: skip


# ----------------------------------------------------------------------------- policy loss


def loss_batch(seed: int = 0, b: int = 12, dtype=torch.float64) -> dict:
    """Per-token advantages broadcast from per-response values, as verl passes them; log-ratios
    spread across both clip edges and past the dual clip (ratio > 3 for A < 0)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L + 1, (b,), generator=g)
    mask = torch.arange(L)[None, :] < lengths[:, None]
    logp = -3 * torch.rand(b, L, generator=g, dtype=torch.float64)
    old = logp + 0.6 * torch.randn(b, L, generator=g, dtype=torch.float64)
    adv = torch.randn(b, 1, generator=g, dtype=torch.float64) * mask
    weights = 2 * torch.rand(b, L, generator=g, dtype=torch.float64)
    return dict(logp=logp.to(dtype), old=old.to(dtype), adv=adv.to(dtype), mask=mask,
                weights=weights.to(dtype))  # fmt: skip


def run_loss(name: str, d: dict, agg: str, info: dict, weighted: bool):
    cfg = ActorConfig(strategy="fsdp", rollout_n=G, ppo_micro_batch_size_per_gpu=2,
                      clip_ratio_low=0.2, clip_ratio_high=0.28, loss_agg_mode=agg)  # fmt: skip
    cfg.global_batch_info.update(info)
    logp = d["logp"].clone().requires_grad_()
    loss, metrics = get_policy_loss_fn(name)(
        old_log_prob=d["old"], log_prob=logp, advantages=d["adv"], response_mask=d["mask"],
        loss_agg_mode=agg, config=cfg, rollout_is_weights=d["weights"] if weighted else None,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad, metrics


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "rollout_is_weights"])
@pytest.mark.parametrize("agg", papo_verl.VERL_AGGS)
def test_policy_loss_matches_verl_vanilla_on_two_ranks(agg, weighted):
    full = loss_batch(seed=7)
    shards = [{k: v[r::2] for k, v in full.items()} for r in range(2)]  # rank r's rows
    info = {"dp_size": 2, "batch_num_tokens": int(full["mask"].sum()),
            "global_batch_size": int((full["mask"].sum(-1) > 0).sum()),
            "loss_scale_factor": None}  # fmt: skip
    grads64 = []
    for shard in shards:
        f32 = {k: v.float() if v.is_floating_point() else v for k, v in shard.items()}
        ours = run_loss("papo_fast", f32, agg, info, weighted)
        theirs = run_loss("vanilla", f32, agg, info, weighted)
        theirs64 = run_loss("vanilla", shard, agg, info, weighted)
        assert ours[0].dtype == torch.float32
        # err(ours vs verl's float64) <= 2 * err(verl's float32 vs its float64) + 4 float32 ulps
        # of the result's scale: the derived rule of tests/helpers.py
        assert_close_to_ref(ours[0], theirs64[0], theirs[0], msg=f"{agg} loss")
        assert_close_to_ref(ours[1], theirs64[1], theirs[1], msg=f"{agg} grad")
        if not weighted:  # weights fold into A (choice 4): the fractions then count A*w = 0 too
            for key in ("actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl"):
                assert ours[2][key] == pytest.approx(theirs[2][key], abs=1e-6), key
        grads64.append(run_loss("papo_fast", shard, agg, info, weighted)[1])
    # verl's data parallelism averages the ranks' gradients: that is the one-rank gradient
    # (float64 against float64: F64_ATOL says why)
    alone = {"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None,
             "loss_scale_factor": None}  # fmt: skip
    one = run_loss("papo_fast", full, agg, alone, weighted)[1]
    avg = torch.zeros_like(one)
    avg[0::2], avg[1::2] = grads64[0] / 2, grads64[1] / 2
    assert_close(avg, one, atol=F64_ATOL, msg=f"{agg}: 2 ranks vs 1")


def test_policy_loss_needs_global_counts_on_two_ranks():
    d = loss_batch(seed=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="batch_num_tokens is required"):
        run_loss("papo_fast", d, "token-mean", {"dp_size": 2}, False)
