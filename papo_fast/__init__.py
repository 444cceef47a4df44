"""papo_fast: Triton-accelerated PAPO / GRPO for LLM reinforcement learning."""

from papo_fast.kernels.advantages import Advantages, papo_advantages, token_advantages
from papo_fast.kernels.policy_loss import PolicyLoss, PolicyLossModule, policy_loss

__all__ = [
    "Advantages",
    "papo_advantages",
    "token_advantages",
    "PolicyLoss",
    "PolicyLossModule",
    "policy_loss",
]

__version__ = "0.1.0"
