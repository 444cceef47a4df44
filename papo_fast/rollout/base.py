"""The rollout interface: token-id prompts in, sampled responses out, in the same order.

    samples = backend.generate([Request(prompt_ids, seed), ...], SamplingParams(temperature=1.0))

The trainer sees only ``RolloutBackend.generate`` and ``sync_weights`` (called after each optimizer
step, so that a backend with its own copy of the weights can refresh it). Implementations:
``papo_fast.rollout.hf.HFGenerateBackend`` (Hugging Face generate, runs anywhere) and
``papo_fast.rollout.vllm.VLLMRollout`` (vLLM, an optional extra).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 64


class Request(NamedTuple):
    prompt_ids: list[int]
    seed: int


class Sample(NamedTuple):
    prompt_ids: list[int]
    response_ids: list[int]  # ends with EOS when finished
    finished: bool
    # [len(response_ids)] the sampler's log p of each response token, at the sampling temperature,
    # when the backend reports them (VLLMRollout); None otherwise (HFGenerateBackend)
    logprobs: list[float] | None = None


class RolloutBackend(ABC):
    """Interface of a sampler. Implementations: hf.HFGenerateBackend, vllm.VLLMRollout.

    A backend whose sampler can differ from the trained model fills ``Sample.logprobs``; the
    trainer then corrects for the difference (trainer.py, choice "Rollout correction").
    """

    @abstractmethod
    def generate(self, requests: list[Request], params: SamplingParams) -> list[Sample]:
        """One Sample per request, in order."""

    def sync_weights(self, model: torch.nn.Module) -> None:  # noqa: B027 (optional hook)
        """Called after every optimizer step with the trained model; nothing by default."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Free what the backend holds (an engine); nothing by default."""
