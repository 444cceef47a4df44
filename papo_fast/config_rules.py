"""The rule of every numeric setting of the training configuration (config.py checks them).

Each key "section.key" has one interval of allowed values (``Bounds``); a nullable key may also be
null, and every float must be finite. Every numeric setting has a rule here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Bounds:
    """An interval of allowed numbers; ``str()`` states it the way the error message does."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, v: float) -> bool:
        above = v > self.low if self.low_open else v >= self.low
        below = v < self.high if self.high_open else v <= self.high
        return above and below

    def __str__(self) -> str:
        if self.low == -math.inf and self.high == math.inf:
            return "a finite number"
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low}, {self.high}{right}"


AT_LEAST_0, AT_LEAST_1 = Bounds(0), Bounds(1)
POSITIVE = Bounds(0, low_open=True)
FRACTION = Bounds(0, 1, low_open=True)  # (0, 1]
BELOW_1 = Bounds(0, 1, high_open=True)  # [0, 1)

# The one rule of every numeric key ("null or" the rule where the key may be null); every float
# must also be finite. A tuple's rule holds for each item.
NUMERIC_RULES: dict[str, Bounds] = {
    "rollout.group_size": AT_LEAST_1,
    "rollout.temperature": POSITIVE,  # log-probs are taken at the sampling temperature
    "rollout.top_p": FRACTION,
    "rollout.max_new_tokens": AT_LEAST_1,
    "rollout.batch_size": AT_LEAST_1,
    "rollout.vllm.gpu_memory_utilization": FRACTION,
    "rollout.vllm.max_model_len": AT_LEAST_1,
    "rollout.vllm.kv_cache_gib": AT_LEAST_1,  # vLLM reads a whole number of GiB
    "rollout.vllm.sleep_level": Bounds(0, 2),
    "advantage.lam": Bounds(),
    "advantage.eps": POSITIVE,
    "optim.lr": POSITIVE,
    "optim.weight_decay": AT_LEAST_0,
    "optim.betas": BELOW_1,
    "optim.grad_clip": POSITIVE,  # a negative norm would reverse every update
    "optim.warmup_steps": AT_LEAST_0,
    "train.seed": Bounds(0, 2**32, high_open=True),  # the sampler's seed * 1_000_003 fits int64
    "train.steps": AT_LEAST_0,
    "train.prompts_per_step": AT_LEAST_1,
    "train.mini_batches": AT_LEAST_1,
    "train.micro_batch_size": AT_LEAST_1,
    "train.micro_batch_tokens": AT_LEAST_0,  # 0: micro-batches of micro_batch_size rows
    "train.eval_every": AT_LEAST_0,
    "train.eval_prompts": AT_LEAST_1,
    "train.eval_k": AT_LEAST_1,
    "train.eval_temperature": POSITIVE,
    "train.save_every": AT_LEAST_0,
    "train.keep_checkpoints": AT_LEAST_1,  # pruning to none would delete the checkpoint just saved
    "train.threads": Bounds(0, 2**31 - 1),  # torch.set_num_threads takes a C int
}
