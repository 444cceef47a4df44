"""papo_fast's verl trainer glue and reward path, through verl 0.9.1's own code (CPU).

Runs in its own virtual environment (.ci/run's verl group); elsewhere the module is skipped.
- the legacy ``compute_advantage`` patch, on verl's own ``compute_advantage``;
- the v1 ``papo_sync`` trainer: built by verl's __init__ from verl's default config, runs verl's
  sync code paths, hands the process score to ``papo`` in verl's ``_compute_advantage`` against a
  real TransferQueue (local Ray), refuses multi-output sessions;
- ``compute_score``: made, loaded as verl loads a custom reward function, run by verl's naive
  reward manager (whose reward_extra_info the v1 agent loop stores);
- examples/verl/papo_qwen2.5.yaml through hydra and verl's config checks.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("verl")

from omegaconf import OmegaConf, open_dict  # noqa: E402
from test_verl import algorithm, verl_batch  # noqa: E402
from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn  # noqa: E402

from papo_fast.integrations import verl as papo_verl  # noqa: E402
from papo_fast.integrations.verl_fields import fields_from_rows  # noqa: E402
from papo_fast.integrations.verl_reward import make_compute_score  # noqa: E402
from papo_fast.kernels.advantages import papo_advantages  # noqa: E402
from papo_fast.rewards.base import Judge  # noqa: E402

pytestmark = pytest.mark.verl

# ----------------------------------------------------------------------------- trainer glue


def test_legacy_patch_hands_non_tensor_batch_to_papo(monkeypatch):
    from verl import DataProto
    from verl.trainer.ppo import ray_trainer

    from papo_fast.integrations.verl_trainer import patch_legacy_trainer

    monkeypatch.setattr(ray_trainer, "compute_advantage", ray_trainer.compute_advantage)
    b = verl_batch(seed=9)

    def data():  # as RayPPOTrainer.fit has it: compute_score's dict merged into non_tensor_batch
        return DataProto.from_dict(
            tensors={"token_level_rewards": b["rewards"], "response_mask": b["mask"]},
            non_tensors={"uid": b["uids"], "papo_process": b["process"].numpy(),
                         "acc": b["correct"].float().numpy()},
        )  # fmt: skip

    with pytest.raises(ValueError, match="papo_process"):  # verl alone hands over nothing
        ray_trainer.compute_advantage(data(), adv_estimator="papo", config=algorithm())
    patch_legacy_trainer()
    patch_legacy_trainer()  # idempotent
    assert ray_trainer.compute_advantage.__wrapped__.__module__ == "verl.trainer.ppo.ray_trainer"
    out = ray_trainer.compute_advantage(data(), adv_estimator="papo", config=algorithm(lam=0.5))
    _, gid = np.unique(b["uids"].astype(str), return_inverse=True)
    want = papo_advantages(b["outcome"], b["process"], group_ids=torch.from_numpy(gid),
                           correct=b["correct"], lam=0.5)  # fmt: skip
    assert torch.equal(out.batch["advantages"], want.advantages[:, None] * b["mask"])
    # other estimators pass through the wrapper unchanged
    grpo = ray_trainer.compute_advantage(data(), adv_estimator="grpo", config=algorithm())
    ref, _ = get_adv_estimator_fn("grpo")(token_level_rewards=b["rewards"],
                                          response_mask=b["mask"], index=b["uids"])  # fmt: skip
    assert torch.equal(grpo.batch["advantages"], ref)


# ----------------------------------------------------------------------------- compute_score


class CountingJudge(Judge):
    """Scores 0.5 when the response shows its work ("because"), else 1; counts its calls."""

    def __init__(self):
        self.calls = 0

    def score(self, problems, responses, answers):
        self.calls += len(responses)
        assert all(p == "What is 2 + 3?" for p in problems)
        return [0.5 if "because" in r else 1.0 for r in responses]


def test_compute_score_returns_outcome_correctness_and_process():
    judge = CountingJudge()
    score = make_compute_score("answer_line", judge)
    info = {"question": "What is 2 + 3?"}
    assert score("arith", "5 because 2 + 3\nAnswer: 5", "5", info) == {
        "score": 1.0, "acc": 1.0, "papo_process": 0.5}  # fmt: skip
    assert score("arith", "Answer: 5", "5", info)["papo_process"] == 1.0
    assert judge.calls == 2
    # a wrong response: process 0, the judge is not asked
    assert score("arith", "Answer: 6", "5", info) == {"score": 0.0, "acc": 0.0, "papo_process": 0.0}
    assert judge.calls == 2
    with pytest.raises(ValueError, match="extra_info has no 'question'"):
        score("arith", "Answer: 5", "5", {"prompt": "What is 2 + 3?"})


def test_compute_score_loads_as_verl_custom_reward_function():
    from verl.trainer.ppo.reward import get_custom_reward_fn

    config = OmegaConf.create({"reward": {"custom_reward_function": {
        "path": "pkg://papo_fast.integrations.verl_reward", "name": "compute_score",
        "reward_kwargs": {"verifier": "answer_line", "judge": "none"}}}})  # fmt: skip
    fn = get_custom_reward_fn(config)
    out = fn(data_source="arith", solution_str="Answer: 7", ground_truth="7", extra_info={})
    assert out == {"score": 1.0, "acc": 1.0, "papo_process": 0.0}


# ----------------------------------------------------------------------------- v1 trainer


def v1_trainer(**algo):
    """verl's own papo_sync trainer, built by verl's __init__ from verl's generated default
    config (nothing of it needs a GPU before fit())."""
    import verl
    from verl.trainer.ppo.v1 import get_trainer_cls

    path = os.path.join(
        os.path.dirname(verl.__file__), "trainer/config/_generated_ppo_trainer.yaml"
    )
    cfg = OmegaConf.load(path)
    cfg.trainer.v1.trainer_mode = "papo_sync"
    cfg.algorithm.adv_estimator = "papo"
    cfg.actor_rollout_ref.rollout.n = 4
    with open_dict(cfg):
        cfg.algorithm.papo = algo
    return get_trainer_cls(cfg.trainer.v1.trainer_mode)(cfg)


def test_papo_sync_runs_verl_sync_code_paths():
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer, ReplayBufferAsync

    trainer = v1_trainer()
    # verl compares trainer_mode with "sync": any other name builds the async replay buffer
    assert trainer.trainer_mode == "sync"
    assert type(trainer.replay_buffer) is ReplayBuffer
    assert not isinstance(trainer.replay_buffer, ReplayBufferAsync)


@pytest.fixture(scope="module")
def transfer_queue():
    """A local Ray and TransferQueue (controller and one storage unit, one logical CPU each)."""
    import ray
    import transfer_queue as tq

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    tq.init(OmegaConf.create({"backend": {"SimpleStorage": {"num_data_storage_units": 1}}}))
    yield tq
    tq.close()
    ray.shutdown()


def agent_loop_rows(b: dict, n: int) -> tuple[list[str], list[dict]]:
    """The first n rows of ``b`` as verl's v1 agent loop puts them in TransferQueue: keys
    uid_session_index, ragged response fields, compute_score's dict in extra_fields."""
    keys, rows, sessions = [], [], {}
    for i in range(n):
        uid, length = b["uids"][i], int(b["mask"][i].sum())
        sessions[uid] = sessions.get(uid, -1) + 1
        keys.append(f"{uid}_{sessions[uid]}_0")
        info = {"score": float(b["outcome"][i]), "acc": float(b["correct"][i]),
                "papo_process": float(b["process"][i])}  # fmt: skip
        rows.append({"uid": uid, "responses": torch.ones(length, dtype=torch.int64),
                     "response_mask": torch.ones(length, dtype=torch.int64),
                     "rm_scores": b["rewards"][i, :length].clone(),
                     "extra_fields": {"reward_extra_info": info}})  # fmt: skip
    return keys, rows


def test_papo_sync_hands_the_process_score_through_transfer_queue(transfer_queue):
    from verl.trainer.ppo.v1 import PPOTrainerSync
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    tq = transfer_queue
    b = verl_batch(seed=11)
    n = 64  # rows of 8 groups at most, in verl_batch's shuffled order: ragged groups
    keys, rows = agent_loop_rows(b, n)
    meta = tq.kv_batch_put(keys=keys, partition_id="train", fields=list_of_dict_to_tensordict(rows))
    trainer = v1_trainer(mode="papo", lam=0.8)
    with pytest.raises(ValueError, match="papo_process"):  # verl's own sync trainer: no hand-over
        PPOTrainerSync._compute_advantage(trainer, meta, {})
    metrics = {}
    trainer._compute_advantage(meta, metrics)
    got = tq.kv_batch_get(keys=keys, partition_id="train", select_fields=["advantages"])
    got = got["advantages"].to_padded_tensor(padding=0.0)  # [n, L'] nested -> padded
    _, gid = np.unique(b["uids"][:n].astype(str), return_inverse=True)
    want = papo_advantages(b["outcome"][:n], b["process"][:n], group_ids=torch.from_numpy(gid),
                           correct=b["correct"][:n], lam=0.8)  # fmt: skip
    mask = b["mask"][:n, : got.shape[1]]
    assert torch.equal(got, want.advantages[:, None] * mask)
    assert metrics["papo/num_groups"] == len(set(b["uids"][:n]))
    assert metrics["papo/proc_active_frac"] == pytest.approx(float(want.stats["proc_active_frac"]))


# ----------------------------------------------------------------------------- example config


def test_example_config_composes_and_validates_with_verl():
    """examples/verl/papo_qwen2.5.yaml as verl's main_ppo reads it (hydra over verl's own
    ppo_trainer defaults), checked by verl's validate_config, its trainer and reward function
    built by verl's loaders. Training itself (8 GPUs, a judge server) is not run."""
    from hydra import compose, initialize_config_dir
    from verl.trainer.ppo.reward import get_custom_reward_fn
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.trainer.ppo.v1 import get_trainer_cls
    from verl.utils.config import validate_config

    examples = os.path.join(os.path.dirname(__file__), "..", "examples", "verl")
    with initialize_config_dir(config_dir=os.path.abspath(examples), version_base=None):
        cfg = compose(config_name="papo_qwen2.5")
    validate_config(
        cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg)
    )
    assert (cfg.data.train_batch_size, cfg.actor_rollout_ref.rollout.n) == (128, 8)
    actor = cfg.actor_rollout_ref.actor
    assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.use_kl_loss) == (0.2, 0.28, False)
    assert cfg.data.train_batch_size // actor.ppo_mini_batch_size == 4
    assert get_policy_loss_fn(actor.policy_loss.loss_mode) is get_policy_loss_fn("papo_fast")
    trainer = get_trainer_cls(cfg.trainer.v1.trainer_mode)(cfg)
    assert trainer.trainer_mode == "sync"
    assert papo_verl.PAPOSettings.from_algorithm(cfg.algorithm)[0].mode == "papo"
    assert callable(get_custom_reward_fn(cfg))


def test_papo_sync_refuses_multi_output_sessions():
    from types import SimpleNamespace

    trainer = v1_trainer()
    meta = SimpleNamespace(keys=["a_0_0", "a_1_0", "a_1_1"], partition_id="train")
    with pytest.raises(ValueError, match="'a_1_1' is not a session's only output"):
        trainer._compute_advantage(meta, {})


class ByteTokenizer:
    """decode() is all verl's naive reward manager asks of a tokenizer: one byte a token id."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(int(i) for i in ids).decode()


def test_verl_reward_manager_carries_compute_score_fields():
    """verl's own naive reward manager (what the v1 agent loop runs per response) on our
    compute_score: its reward_extra_info, which the agent loop stores in extra_fields, is what
    papo_sync reads."""
    import asyncio

    from verl import DataProto
    from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls

    judge = CountingJudge()
    texts = ["5 because 2 + 3\nAnswer: 5", "Answer: 5", "Answer: 4"]

    def row(text: str) -> DataProto:
        ids = torch.tensor([list(text.encode()) + [0, 0]])  # right padding after the response
        prompt = torch.ones(1, 3, dtype=torch.int64)
        attention = torch.cat([prompt, (ids != 0).long()], dim=1)
        return DataProto.from_dict(
            tensors={"prompts": prompt, "responses": ids, "attention_mask": attention},
            non_tensors={"data_source": np.array(["arith"], dtype=object),
                         "reward_model": np.array([{"ground_truth": "5"}], dtype=object),
                         "extra_info": np.array([{"question": "What is 2 + 3?"}], dtype=object)},
        )  # fmt: skip

    async def score_all():
        cls = get_reward_manager_cls("naive")
        manager = cls(None, ByteTokenizer(), make_compute_score("answer_line", judge))
        return [await manager.run_single(row(t)) for t in texts]

    results = asyncio.run(score_all())
    assert [r["reward_score"] for r in results] == [1.0, 1.0, 0.0]
    infos = [r["reward_extra_info"] for r in results]
    fields = fields_from_rows(["u", "u", "u"], infos)
    assert fields.process.tolist() == [0.5, 1.0, 0.0]
    assert fields.correct.tolist() == [True, True, False]
    assert judge.calls == 2


def test_legacy_patch_applies_through_verl_external_modules():
    """The legacy trainer runs in a Ray actor: the patch reaches it as verl's own external-module
    switch, applied when that process imports verl."""
    import subprocess
    import sys

    probe = (
        "from verl.trainer.ppo import ray_trainer\n"
        "print(getattr(ray_trainer.compute_advantage, 'papo_fast_patched', False))\n"
    )
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="papo_fast.integrations.verl_legacy")
    run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-1] == "True"
