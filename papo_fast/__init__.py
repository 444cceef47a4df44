"""papo_fast: Triton-accelerated PAPO / GRPO for LLM reinforcement learning."""

from papo_fast.kernels.advantages import Advantages, papo_advantages, token_advantages

__all__ = ["Advantages", "papo_advantages", "token_advantages"]

__version__ = "0.1.0"
