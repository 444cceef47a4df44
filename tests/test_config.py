"""Config loading: YAML, --set overrides, and clear errors for bad keys and values."""

import re

import pytest

from papo_fast.config import ConfigError, config_from_dict, load_config


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("advantage:\n  mode: orm\nloss:\n  eps_high: 0.3\n")
    cfg = load_config(path, ["loss.eps_high=0.28", "train.steps=5", "model.ref_path=null"])
    assert cfg.advantage.mode == "orm"
    assert cfg.loss.eps_high == 0.28 and cfg.loss.eps_low == 0.2
    assert cfg.train.steps == 5 and cfg.model.ref_path is None
    assert cfg.optim.betas == (0.9, 0.999)
    assert config_from_dict({"optim": {"lr": 1}}).optim.lr == 1.0  # int accepted for float


@pytest.mark.parametrize(
    "data, overrides, message",
    [
        ({"loss": {"eps_hgh": 0.3}}, [], "unknown key config.loss.eps_hgh; valid keys: eps_low"),
        ({"trainer": {}}, [], "unknown key config.trainer"),
        ({}, ["loss.nope=1"], "unknown key config.loss.nope"),
        ({}, ["advantage.mode=grpo"], "advantage.mode must be one of"),
        ({}, ["train.steps=ten"], "config.train.steps must be int"),
        ({}, ["train.steps=1.5"], "config.train.steps must be int"),
        ({}, ["rollout.group_size=0"], "rollout.group_size must be >= 1"),
        ({}, ["eps_high=0.3"], "section.key=value"),
        ({}, ["loss.eps_high"], "section.key=value"),
        ({"loss": 3}, [], "config.loss must be a mapping"),
        ({}, ["train.mini_batches=3"], "split evenly"),
        ({}, ["reward.judge=none"], "needs a judge"),
        ({}, ["rollout.top_p=1.5"], "top_p"),
        ({}, ["loss.is_cap=0"], "loss.is_cap must be null or > 0"),
        ({}, ["rollout.vllm.gpu_mem=0.5"], "unknown key config.rollout.vllm.gpu_mem; valid keys:"),
        ({"rollout": {"vllm": 1}}, [], "config.rollout.vllm must be a mapping"),
        ({}, ["rollout.vllm.gpu_memory_utilization=1.5"], "gpu_memory_utilization must be in"),
        ({}, ["rollout.vllm.max_model_len=0"], "max_model_len must be null or >= 1"),
        ({}, ["rollout.vllm.dtype=fp8"], "rollout.vllm.dtype must be null or one of"),
        ({}, ["rollout.vllm.enforce_eager=1"], "config.rollout.vllm.enforce_eager must be bool"),
        ({}, ["rollout.vllm.engine_kwargs=[1]"], "engine_kwargs must be dict"),
        ({}, ["rollout.vllm.engine_kwargs={dtype: half}"], "may not set ['dtype']"),
        ({}, ["rollout.batch_size.x=1"], "config.rollout.batch_size must be int"),
        ({}, ["model.device=gpu"], "model.device must be auto, cpu, cuda or cuda:N"),
    ],
)
def test_config_errors(data, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict(data, overrides)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_example_configs_load():
    from pathlib import Path

    examples = sorted(Path(__file__).parent.parent.glob("examples/*.yaml"))
    assert examples
    for path in examples:
        load_config(path)


def test_vllm_engine_options(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "rollout:\n  backend: vllm\n  vllm:\n    gpu_memory_utilization: 0.5\n"
        "    max_model_len: 4096\n    engine_kwargs: {enable_prefix_caching: true}\n"
    )
    cfg = load_config(path, ["rollout.vllm.enforce_eager=true", "rollout.vllm.kv_cache_gib=2"])
    assert cfg.rollout.vllm.engine_options() == {  # no dtype: the trainer's model.dtype
        "gpu_memory_utilization": 0.5,
        "max_model_len": 4096,
        "enforce_eager": True,
        "kv_cache_gib": 2.0,
        "enable_prefix_caching": True,
    }
    cfg = config_from_dict({}, ["rollout.vllm.dtype=bfloat16"])
    assert cfg.rollout.vllm.engine_options()["dtype"] == "bfloat16"
    assert cfg.to_dict()["rollout"]["vllm"]["engine_kwargs"] == {}
    assert config_from_dict({}).loss.is_cap == 2.0
    assert config_from_dict({}, ["loss.is_cap=null"]).loss.is_cap is None
