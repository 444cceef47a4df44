"""papo_fast: Triton-accelerated PAPO / GRPO for LLM reinforcement learning."""

__version__ = "0.1.0"
