"""papo_fast: Triton-accelerated PAPO / GRPO for LLM reinforcement learning."""

# config, rewards and trainer import transformers, datasets and yaml only when they run.
from papo_fast.config import Config, load_config
from papo_fast.kernels.advantages import Advantages, papo_advantages, token_advantages
from papo_fast.kernels.fused_linear_logprobs import fused_linear_logprobs
from papo_fast.kernels.fused_linear_policy_loss import (
    FusedPolicyLoss,
    PAPOLoss,
    fused_linear_policy_loss,
)
from papo_fast.kernels.policy_loss import PolicyLoss, PolicyLossModule, policy_loss
from papo_fast.rewards import Judge, Outcome, Verifier
from papo_fast.trainer import Trainer

__all__ = [
    "Advantages",
    "papo_advantages",
    "token_advantages",
    "PolicyLoss",
    "PolicyLossModule",
    "policy_loss",
    "fused_linear_logprobs",
    "fused_linear_policy_loss",
    "FusedPolicyLoss",
    "PAPOLoss",
    "Config",
    "load_config",
    "Judge",
    "Outcome",
    "Verifier",
    "Trainer",
]

__version__ = "0.1.0"
