"""Rollouts with Hugging Face generate: the backend that runs anywhere.

    backend = HFGenerateBackend(model, tokenizer, batch_size=256)
    samples = backend.generate([Request(prompt_ids, seed), ...], SamplingParams(temperature=1.0))

In one process generate samples from the trained module itself and ``sync_weights`` does
nothing. A sharded module cannot generate on its own (every forward is a collective, and ranks
stop at different lengths), so a run on many processes gives each rank's backend a plain copy of
the model, which ``sync_weights`` refreshes from the gathered weights after each update.

Choices:
1. **Per-request seeds.** Sampling is Gumbel-max: a logits processor adds Gumbel noise drawn from
   one torch.Generator per request (seeded by ``Request.seed``) to the temperature/top-p-warped
   scores, and generate then takes the argmax (do_sample=False). That samples exactly from
   softmax(top_p(logits / T)), and a request's tokens do not depend on the global RNG or on the
   other requests of its batch (up to the floating-point effects of padding).
2. **Greedy at temperature 0.** No noise is added: the argmax is greedy decoding.
3. **Left padding.** Prompts are left-padded in a batch; a response ends at EOS (included in
   ``response_ids``, so the policy learns to stop) or after max_new_tokens (``finished=False``).
4. **No sampler log-probs.** ``Sample.logprobs`` is None: generate samples from the trained
   module itself, so the trainer's log-probs are the sampler's and there is nothing to correct
   (trainer.py, choice "Rollout correction").
"""

from __future__ import annotations

import torch

from papo_fast.batching import pad_ids
from papo_fast.distributed import full_state_dict
from papo_fast.rollout.base import Request, RolloutBackend, Sample, SamplingParams


class _SeededGumbel:
    """Logits processor: adds per-row Gumbel noise from per-request generators."""

    def __init__(self, seeds: list[int]):
        self.gens = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        u = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in self.gens])  # [B, V]
        gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
        return scores.float() + gumbel.to(scores.device)


class HFGenerateBackend(RolloutBackend):
    """Sampling with transformers' ``generate`` on the training model itself."""

    def __init__(self, model, tokenizer, batch_size: int = 256):
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs eos_token and pad_token for rollouts")
        self.model, self.batch_size = model, batch_size
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy the trained weights into this backend's model, unless it is the trained one."""
        if model is self.model:
            return
        own = self.model.state_dict()
        for name, t in full_state_dict(model).items():
            own[name].copy_(t)

    @torch.no_grad()
    def generate(self, requests: list[Request], params: SamplingParams) -> list[Sample]:
        out: list[Sample] = []
        for start in range(0, len(requests), self.batch_size):
            out += self._generate_batch(requests[start : start + self.batch_size], params)
        return out

    def _generate_batch(self, requests: list[Request], params: SamplingParams) -> list[Sample]:
        from transformers import (
            GenerationConfig,
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopPLogitsWarper,
        )

        device = next(self.model.parameters()).device
        ids, attn, _ = pad_ids([r.prompt_ids for r in requests], self.pad, left=True)
        width = ids.shape[1]
        procs = LogitsProcessorList()
        if params.temperature > 0:
            procs.append(TemperatureLogitsWarper(params.temperature))
            if params.top_p < 1.0:
                procs.append(TopPLogitsWarper(params.top_p))
            procs.append(_SeededGumbel([r.seed for r in requests]))
        gen_cfg = GenerationConfig(
            do_sample=False,
            max_new_tokens=params.max_new_tokens,
            eos_token_id=self.eos,
            pad_token_id=self.pad,
        )
        was_training = self.model.training
        self.model.eval()
        try:
            seqs = self.model.generate(
                input_ids=ids.to(device),
                attention_mask=attn.to(device),
                generation_config=gen_cfg,
                logits_processor=procs,
            )
        finally:
            self.model.train(was_training)
        new = seqs[:, width:].cpu()
        samples = []
        for r, row in zip(requests, new.tolist(), strict=True):
            finished = self.eos in row
            resp = row[: row.index(self.eos) + 1] if finished else row
            samples.append(Sample(list(r.prompt_ids), resp, finished))
        return samples
