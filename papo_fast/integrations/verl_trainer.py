"""The trainer glue that hands ``compute_score``'s extra fields to the ``papo`` estimator.

verl 0.9.1 offers no hook for this: its ``compute_advantage`` passes an estimator the token
rewards, the mask and the uids (only ``gdpo``, by name, gets the batch's other fields). So:

- v1 trainer (verl's default): the registered mode ``trainer.v1.trainer_mode=papo_sync``, verl's
  ``sync`` trainer whose ``_compute_advantage`` first reads the rows' ``extra_fields`` (where the
  v1 agent loop stores ``compute_score``'s dict as ``reward_extra_info``) from TransferQueue,
  then runs verl's own ``_compute_advantage`` with them handed over (verl_fields.py).
- legacy trainer (``trainer.use_v1=False``): ``patch_legacy_trainer()`` wraps the
  ``compute_advantage`` that verl's ``RayPPOTrainer.fit`` calls; for ``adv_estimator=papo`` it
  hands over the columns of ``non_tensor_batch`` (where the legacy trainer puts the dict).

Choices:
1. **papo_sync is sync.** verl's base trainer compares ``trainer_mode`` with the literal "sync"
   (replay buffer, dataloader refill, checkpoints of in-flight prompts), so any other name would
   run the async code paths. ``papo_sync`` sets ``trainer_mode = "sync"`` before verl builds the
   replay buffer and reads ``trainer.v1.sync``: the run is verl's sync trainer, step for step.
2. **Metrics.** The estimator's group statistics are logged as ``papo/<name>`` (zero-advantage
   share, share of groups with an active process part, mean advantages of correct and wrong
   responses).
3. **One output per session.** Agent loops that return several outputs per session are refused
   by name rather than counted several times in their group.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import transfer_queue as tq
from transfer_queue import KVBatchMeta
from verl.trainer.ppo import ray_trainer
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

from papo_fast.integrations.verl_fields import (
    RewardFields,
    fields_from_columns,
    fields_from_rows,
    handing_over,
)

TRAINER_MODE = "papo_sync"
ESTIMATOR = "papo"  # algorithm.adv_estimator (verl.py registers it)


def _as_list(column: Any) -> list:
    """A TransferQueue non-tensor column (a list, a NonTensorStack or a numpy array) as a list."""
    return column.tolist() if hasattr(column, "tolist") else list(column)


def v1_reward_fields(data: Any) -> RewardFields:
    """The fields of rows read from TransferQueue with ``select_fields=["uid", "extra_fields"]``."""
    uids = _as_list(data["uid"])
    infos = []
    for extra in _as_list(data["extra_fields"]):
        extra = getattr(extra, "data", extra)
        infos.append(extra.get("reward_extra_info") if isinstance(extra, dict) else None)
    return fields_from_rows(uids, infos)


def check_one_output_per_session(keys: list[str]) -> None:
    """verl's v1 keys are ``{uid}_{session}_{output}``. A multi-output agent loop (several outputs
    of one session, e.g. one per turn) would put one session in its group several times: verl's
    ``grpo`` keeps the last output of each session, ``papo`` refuses (choice 3)."""
    for key in keys:
        if not key.endswith("_0"):
            raise ValueError(
                f"papo_sync: row {key!r} is not a session's only output; the papo estimator "
                "supports agent loops with one output per session"
            )


def log_stats(fields: RewardFields, metrics: dict) -> None:
    """The estimator's statistics as ``papo/<name>`` (NaN ones, undefined, are left out)."""
    metrics.update({f"papo/{k}": v for k, v in fields.stats.items() if not math.isnan(v)})


@register_trainer(TRAINER_MODE)
class PAPOTrainerSync(PPOTrainerSync):
    """verl's sync v1 trainer, with the process score handed to the ``papo`` estimator."""

    def _build_replay_buffer(self):
        # choice 1: verl's __init__ calls this right after reading trainer_mode
        self.trainer_mode = "sync"
        sync = self.config.trainer.v1.get("sync", {}) or {}
        self.parameter_sync_step = sync.get("parameter_sync_step", 1)
        return super()._build_replay_buffer()

    def _compute_advantage(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        if self.config.algorithm.adv_estimator != ESTIMATOR:
            return super()._compute_advantage(batch, metrics)
        check_one_output_per_session(batch.keys)
        data = tq.kv_batch_get(
            keys=batch.keys, partition_id=batch.partition_id, select_fields=["uid", "extra_fields"]
        )
        with handing_over(v1_reward_fields(data)) as fields:
            batch = super()._compute_advantage(batch, metrics)
        log_stats(fields, metrics)
        return batch


def _legacy_compute_advantage(original, data, adv_estimator, *args, **kwargs):
    if adv_estimator != ESTIMATOR:
        return original(data, adv_estimator, *args, **kwargs)
    columns = data.non_tensor_batch
    if "uid" not in columns:
        raise ValueError("the papo estimator needs non_tensor_batch['uid'] (the prompt uids)")
    with handing_over(fields_from_columns(np.asarray(columns["uid"]), columns)):
        return original(data, adv_estimator, *args, **kwargs)


def patch_legacy_trainer() -> None:
    """Hand ``compute_score``'s extra fields to ``papo`` in verl's legacy ``RayPPOTrainer``.

    Wraps ``verl.trainer.ppo.ray_trainer.compute_advantage`` (what ``RayPPOTrainer.fit`` calls);
    other estimators pass through unchanged. Idempotent. Call it in the process that runs the
    trainer (verl's TaskRunner), e.g. from a module named in ``VERL_USE_EXTERNAL_MODULES``.
    """
    current = ray_trainer.compute_advantage
    if getattr(current, "papo_fast_patched", False):
        return
    wrapped = functools.wraps(current)(functools.partial(_legacy_compute_advantage, current))
    wrapped.papo_fast_patched = True
    ray_trainer.compute_advantage = wrapped
