"""papo_advantages' estimators against verl 0.9.1's own advantage functions (CPU), on verl-shaped
batches: string uids, shuffled rows, right-padded response masks, each reward on its response's
last valid token. verl computes in float32; both sides are checked against the float64 reference
within twice verl's own error (tests/helpers.py's rule).

- ``rloo`` vs ``compute_rloo_outcome_advantage``;
- ``drgrpo`` vs ``compute_grpo_outcome_advantage(norm_adv_by_std_in_grpo=False)``;
- ``reinforce_pp`` (token counts as ``lengths``) vs
  ``compute_reinforce_plus_plus_baseline_outcome_advantage`` (whitened over tokens);
- ``gdpo`` (two reward columns, weights, token counts) vs ``compute_gdpo_outcome_advantage``.
Every group has at least two responses (verl gives a lone response its raw reward; ours gives 0).
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch

pytest.importorskip("verl")

from helpers import assert_close_to_ref  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402

from papo_fast.kernels.advantages import papo_advantages, papo_advantages_ref  # noqa: E402

pytestmark = pytest.mark.verl

P, L = 17, 11  # prompts, padded response length


def verl_batch(seed: int, k: int = 1) -> dict:
    """Ragged groups (2 to 9 responses), shuffled rows, k reward columns (k = 1: shaped
    outcome-like rewards)."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(2, 10, (P,), generator=g)
    n = int(sizes.sum())
    prompt = np.repeat(np.arange(P), sizes.numpy())
    perm = torch.randperm(n, generator=g).numpy()
    prompt = prompt[perm]
    uids = np.array([str(uuid.UUID(int=seed * 1000 + int(p) + 1)) for p in prompt], dtype=object)
    lengths = torch.randint(1, L + 1, (n,), generator=g)
    mask = (torch.arange(L)[None, :] < lengths[:, None]).float()  # [B, L]
    scores = (torch.rand(n, k, generator=g) < 0.5).float() + 0.3 * torch.rand(n, k, generator=g)
    rewards = torch.zeros(n, L)
    rewards[torch.arange(n), lengths - 1] = scores.sum(1)
    return dict(uids=uids, ids=torch.as_tensor(prompt), mask=mask, lengths=lengths,
                scores=scores, rewards=rewards)  # fmt: skip


def check(ours, verl_tokens, scores, kw, msg):
    """verl's [B, L] advantages hold one value per response on its tokens: read row-wise."""
    verl_adv = verl_tokens[:, 0]
    want = papo_advantages_ref(scores, **kw).advantages
    assert_close_to_ref(ours, want, verl_adv, msg=f"{msg}: ours")
    assert_close_to_ref(verl_adv, want, verl_adv, msg=f"{msg}: verl")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rloo_drgrpo_reinforce_pp_match_verl(backend):
    b = verl_batch(seed=1)
    r = b["scores"][:, 0]
    cases = {
        "rloo": core_algos.compute_rloo_outcome_advantage(b["rewards"], b["mask"], b["uids"]),
        "drgrpo": core_algos.compute_grpo_outcome_advantage(
            b["rewards"], b["mask"], b["uids"], norm_adv_by_std_in_grpo=False
        ),
        "reinforce_pp": core_algos.compute_reinforce_plus_plus_baseline_outcome_advantage(
            b["rewards"], b["mask"], b["uids"]
        ),
    }
    for estimator, (verl_adv, _) in cases.items():
        kw = dict(group_ids=b["ids"], mode="orm", estimator=estimator)
        if estimator == "reinforce_pp":  # verl whitens over tokens: each response weighs its length
            kw["lengths"] = b["lengths"]
        ours = papo_advantages(r, backend=backend, **kw).advantages
        check(ours, verl_adv, r, kw, estimator)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gdpo_matches_verl(backend):
    b = verl_batch(seed=2, k=2)
    n, prompt_len = b["mask"].shape[0], 3
    # verl reads the columns from non_tensor_batch and puts each on the last valid token it
    # finds from batch["attention_mask"]'s response part
    attention = torch.cat([torch.ones(n, prompt_len), b["mask"]], 1).long()  # verl: integers
    batch = {"prompts": torch.zeros(n, prompt_len, dtype=torch.long), "attention_mask": attention}
    config = OmegaConf.create({"gdpo_reward_keys": ["a", "b"], "gdpo_reward_weights": [1.0, 0.5]})
    non_tensor = {"a": b["scores"][:, 0].numpy(), "b": b["scores"][:, 1].numpy()}
    verl_adv, _ = core_algos.compute_gdpo_outcome_advantage(
        b["rewards"], b["mask"], b["uids"], config=config, non_tensor_batch=non_tensor, batch=batch
    )
    kw = dict(group_ids=b["ids"], mode="orm", estimator="gdpo", lengths=b["lengths"])
    ours = papo_advantages(b["scores"], reward_weights=[1.0, 0.5], backend=backend, **kw)
    check(ours.advantages, verl_adv, b["scores"], dict(kw, reward_weights=torch.tensor([1, 0.5])),
          "gdpo")  # fmt: skip
