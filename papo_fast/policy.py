"""The policy model: loading it, batching its samples, and its hidden states.

model, tok = load_model(path, cfg)                 # on model.device, a clear error if no model
ids, attn, targets, mask = pad_samples(samples, tok.pad_token_id)
h = hidden_states(model, ids, attn)                # [N, L-1, H]: the body only, no LM head

Log-probs come from the hidden states and the LM head without logits, micro-batch by micro-batch:
packing.step_logprobs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from papo_fast.batching import pad_ids
from papo_fast.config import Config, ConfigError
from papo_fast.distributed import launched_size, local_rank

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_device(cfg: Config) -> torch.device:
    """model.device, with "auto" = the GPU when there is one (under torchrun, the process's
    own: cuda:LOCAL_RANK); a CUDA device this machine does not
    have is a ConfigError."""
    name = cfg.model.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and launched_size() > 1:
        name = f"cuda:{local_rank()}"  # one GPU per process
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ConfigError(
                f"model.device is {name!r}, but torch sees {count} CUDA device(s) here; "
                "use model.device: cpu (or auto)"
                + (f", or one of cuda:0..cuda:{count - 1}" if count else "")
            )
    return device


def load_model(path: str, cfg: Config, trainable: bool = True, weights: bool = True):
    """A causal LM (on model.device) and its tokenizer from a local directory (a clear error when
    it is not one). ``weights=False``: the architecture only, its weights to be loaded next (a
    checkpoint's shards). A trainable model recomputes its activations in the backward with
    model.gradient_checkpointing."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not path or not (Path(path) / "config.json").is_file():
        raise ConfigError(f"model path {path!r} is not a directory with a config.json")
    options = {
        "dtype": DTYPES[cfg.model.dtype],
        "attn_implementation": cfg.model.attn_implementation,
    }
    if weights:
        model = AutoModelForCausalLM.from_pretrained(path, **options)
    else:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), **options)
    model = model.to(model_device(cfg))
    model.train(trainable)
    model.requires_grad_(trainable)
    if trainable and cfg.model.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5
        kwargs = {"use_reentrant": False}  # the non-reentrant form: every input's gradient flows
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model, AutoTokenizer.from_pretrained(path)


def pad_samples(samples, pad_id: int):
    """Right-padded prompt+response ids and the mask of response-token targets.

    Returns input_ids [N, L], attention_mask [N, L], targets [N, L-1] (input_ids shifted) and
    loss_mask [N, L-1] (True where the target is a response token).
    """
    rows = [s.prompt_ids + s.response_ids for s in samples]
    ids, attn, resp = pad_ids(rows, pad_id, response_starts=[len(s.prompt_ids) for s in samples])
    return ids, attn, ids[:, 1:], resp[:, 1:]


def pad_rollout_logprobs(samples) -> torch.Tensor | None:
    """The sampler's log-probs aligned with pad_samples' targets: [N, L-1] float32, 0 where the
    target is not a response token; None when the backend returned none (trainer.py, choice
    "Rollout correction")."""
    given = [s.logprobs is not None for s in samples]
    if not any(given):
        return None
    if not all(given):
        raise ValueError("the rollout backend returned log-probs for some samples only")
    width = max(len(s.prompt_ids) + len(s.response_ids) for s in samples) - 1
    out = torch.zeros(len(samples), width)
    for i, s in enumerate(samples):
        if len(s.logprobs) != len(s.response_ids):
            raise ValueError(
                f"sample {i}: {len(s.logprobs)} log-probs for {len(s.response_ids)} tokens"
            )
        p = len(s.prompt_ids)  # response token k is input p + k, predicted at position p + k - 1
        out[i, p - 1 : p - 1 + len(s.response_ids)] = torch.tensor(s.logprobs)
    return out


def hidden_states(model, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Last hidden states of the model body at the positions that predict a token: [N, L-1, H]."""
    out = model.base_model(input_ids=ids, attention_mask=attn, use_cache=False)
    return out.last_hidden_state[:, :-1]
