"""papo_fast: Triton-accelerated PAPO / GRPO for LLM reinforcement learning."""

from papo_fast.kernels.advantages import Advantages, papo_advantages, token_advantages
from papo_fast.kernels.fused_linear_logprobs import fused_linear_logprobs
from papo_fast.kernels.fused_linear_policy_loss import (
    FusedPolicyLoss,
    PAPOLoss,
    fused_linear_policy_loss,
)
from papo_fast.kernels.policy_loss import PolicyLoss, PolicyLossModule, policy_loss

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
]

__version__ = "0.1.0"
