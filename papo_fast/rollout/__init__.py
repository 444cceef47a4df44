"""Rollout backends behind one interface (base.py): Hugging Face generate (hf.py) everywhere, vLLM
(vllm.py) when it is installed."""

from __future__ import annotations

from papo_fast.rollout.base import Request, RolloutBackend, Sample, SamplingParams
from papo_fast.rollout.hf import HFGenerateBackend

__all__ = [
    "HFGenerateBackend",
    "Request",
    "RolloutBackend",
    "Sample",
    "SamplingParams",
    "make_backend",
]


def make_backend(
    name: str,
    model,
    tokenizer,
    batch_size: int,
    vllm_options: dict | None = None,
    model_path: str | None = None,
) -> RolloutBackend:
    """The configured backend: "hf" (batch_size responses per generate call, from ``model``) or
    "vllm" (an engine loaded from ``model_path``, default ``model.name_or_path``, built with
    ``vllm_options``, VLLMRollout's keyword arguments, then given ``model``'s weights)."""
    if name == "hf":
        return HFGenerateBackend(model, tokenizer, batch_size)
    if name == "vllm":  # imported here: vllm is an optional extra
        from papo_fast.rollout.vllm import VLLMRollout

        return VLLMRollout.for_model(model, model_path, **(vllm_options or {}))
    raise ValueError(f"unknown rollout backend {name!r}; available: 'hf', 'vllm'")
