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
        ({}, ["rollout.vllm.sleep_level=3"], "sleep_level must be in"),
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
    sets = ["rollout.vllm.enforce_eager=true", "rollout.vllm.kv_cache_gib=2"]
    cfg = load_config(path, [*sets, "rollout.vllm.sleep_level=1"])
    assert cfg.rollout.vllm.engine_options() == {  # no dtype: the trainer's model.dtype
        "gpu_memory_utilization": 0.5,
        "max_model_len": 4096,
        "enforce_eager": True,
        "kv_cache_gib": 2,
        "sleep_level": 1,
        "enable_prefix_caching": True,
    }
    cfg = config_from_dict({}, ["rollout.vllm.dtype=bfloat16"])
    assert cfg.rollout.vllm.engine_options()["dtype"] == "bfloat16"
    assert cfg.to_dict()["rollout"]["vllm"]["engine_kwargs"] == {}
    assert config_from_dict({}).loss.is_cap == 2.0
    assert config_from_dict({}, ["loss.is_cap=null"]).loss.is_cap is None


# ----------------------------------------------------------------------------- value rules


@pytest.mark.parametrize(
    "override, message",
    [
        # A negative clip norm turns every update into gradient ascent; 0 stops learning.
        ("optim.grad_clip=-1.0", "config.optim.grad_clip must be > 0, got -1.0"),
        ("optim.grad_clip=0", "config.optim.grad_clip must be > 0, got 0.0"),
        # Pruning to zero checkpoints would delete the one just written.
        ("train.keep_checkpoints=0", "config.train.keep_checkpoints must be >= 1, got 0"),
        ("train.eval_prompts=0", "config.train.eval_prompts must be >= 1, got 0"),
        ("train.eval_prompts=-3", "config.train.eval_prompts must be >= 1, got -3"),
        ("train.eval_every=-1", "config.train.eval_every must be >= 0, got -1"),
        ("train.save_every=-1", "config.train.save_every must be >= 0, got -1"),
        ("train.steps=-1", "config.train.steps must be >= 0, got -1"),
        ("train.threads=-2", "config.train.threads must be in [0, 2147483647], got -2"),
        ("train.threads=2147483648", "config.train.threads must be in [0, 2147483647], got"),
        ("train.seed=-1", "config.train.seed must be in [0, 4294967296), got -1"),
        ("train.seed=4294967296", "config.train.seed must be in [0, 4294967296)"),
        ("train.eval_temperature=-0.5", "config.train.eval_temperature must be > 0, got -0.5"),
        ("train.eval_temperature=0", "config.train.eval_temperature must be > 0, got 0.0"),
        ("optim.warmup_steps=-1", "config.optim.warmup_steps must be >= 0, got -1"),
        ("optim.lr=0", "config.optim.lr must be > 0, got 0.0"),
        ("optim.lr=-1e-6", "config.optim.lr must be > 0, got -1e-06"),
        ("optim.weight_decay=-0.1", "config.optim.weight_decay must be >= 0, got -0.1"),
        ("optim.betas=[0.9, 1.0]", "config.optim.betas[1] must be in [0, 1), got 1.0"),
        ("optim.betas=[-0.1, 0.9]", "config.optim.betas[0] must be in [0, 1), got -0.1"),
        ("loss.eps_low=-0.1", "config.loss.eps_low must be in [0, 1), got -0.1"),
        ("loss.eps_low=1", "config.loss.eps_low must be in [0, 1), got 1.0"),
        ("loss.eps_high=-0.1", "config.loss.eps_high must be >= 0, got -0.1"),
        ("loss.beta=-0.01", "config.loss.beta must be >= 0, got -0.01"),
        ("loss.dual_clip=1", "config.loss.dual_clip must be null or > 1, got 1.0"),
        ("loss.dual_clip=0.5", "config.loss.dual_clip must be null or > 1, got 0.5"),
        ("advantage.eps=0", "config.advantage.eps must be > 0, got 0.0"),
        ("advantage.eps=-1e-6", "config.advantage.eps must be > 0, got -1e-06"),
        ("rollout.temperature=0", "config.rollout.temperature must be > 0, got 0.0"),
        ("rollout.top_p=0", "config.rollout.top_p must be in (0, 1], got 0.0"),
        ("rollout.max_new_tokens=0", "config.rollout.max_new_tokens must be >= 1, got 0"),
        ("rollout.vllm.kv_cache_gib=0", "config.rollout.vllm.kv_cache_gib must be null or >= 1"),
        ("rollout.vllm.kv_cache_gib=1.5", "kv_cache_gib must be"),
    ],
)
def test_numeric_rules(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict({}, [override])


@pytest.mark.parametrize(
    "key",
    [
        "optim.lr",
        "optim.grad_clip",
        "optim.weight_decay",
        "advantage.lam",
        "advantage.eps",
        "loss.eps_high",
        "loss.beta",
        "loss.dual_clip",
        "loss.is_cap",
        "rollout.temperature",
        "train.eval_temperature",
    ],
)
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "inf", "nan", "-Infinity", "1e400"])
def test_float_keys_must_be_finite(key, value):
    with pytest.raises(ConfigError, match=re.escape(f"config.{key} must be a finite number")):
        config_from_dict({}, [f"{key}={value}"])


def test_inf_in_a_yaml_file_names_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: .inf\n")
    with pytest.raises(ConfigError, match=re.escape("config.optim.lr must be a finite number")):
        load_config(path)


def test_every_numeric_setting_has_one_rule():
    """A numeric setting added later cannot slip past the value checks."""
    from papo_fast.config import NUMERIC_RULES, numeric_settings

    assert set(numeric_settings()) == set(NUMERIC_RULES)


def test_defaults_and_example_values_pass_the_rules():
    cfg = config_from_dict({}, ["loss.dual_clip=3", "loss.beta=0.04", "train.threads=0"])
    assert cfg.loss.dual_clip == 3.0 and cfg.train.threads == 0
    assert config_from_dict({}, ["loss.is_cap=null", "loss.dual_clip=null"]).loss.is_cap is None
    assert config_from_dict({}, ["advantage.lam=-0.5"]).advantage.lam == -0.5  # any finite


# ----------------------------------------------------------------------------- prompt template


@pytest.mark.parametrize(
    "template, message",
    [
        ("{0}=?", "config.data.prompt_template"),
        ("{question}=?", "config.data.prompt_template"),
        ("{problem} {", "config.data.prompt_template"),
        ("{problem:d}", "config.data.prompt_template"),
        ("{problem.real}", "config.data.prompt_template"),
        ("What is it?", "config.data.prompt_template must contain {problem}"),
    ],
)
def test_prompt_template_must_format_with_problem_only(template, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict({"data": {"prompt_template": template}})


def test_prompt_template_with_literal_braces_is_fine():
    cfg = config_from_dict({"data": {"prompt_template": "{{x}} {problem}=?\n"}})
    assert cfg.data.prompt_template.format(problem="1+1") == "{x} 1+1=?\n"


# ----------------------------------------------------------------------------- config files


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: 1e-6\n  betas: [0.9, 0.99\ntrain:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml, line \d+, column \d+: not valid YAML"):
        load_config(path)
    path.write_text("train:\n  steps: 3\n   seed: 1\n")  # bad indentation on line 3
    with pytest.raises(ConfigError, match=r"bad\.yaml, line 3, column 8: not valid YAML"):
        load_config(path)


def test_config_file_must_hold_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- optim\n- train\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: .*mapping of sections"):
        load_config(path)


def test_config_file_must_be_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("data:\n  prompt_template: 'caf\xe9 {problem}'\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text"):
        load_config(path)


# ----------------------------------------------------------------------------- numbers as written


# (spelling, value): every one is read by Python's float().
FLOAT_SPELLINGS = [
    ("1e-6", 1e-6),
    ("1E-6", 1e-6),
    ("4e-4", 4e-4),
    (".5", 0.5),
    ("1_000", 1000.0),
    ("-0.2", -0.2),
    ("1.0e6", 1e6),
    ("+2.5E+1", 25.0),
]


@pytest.mark.parametrize("text, value", FLOAT_SPELLINGS)
def test_float_spellings_in_set_and_yaml(tmp_path, text, value):
    # advantage.lam takes any finite number, so every spelling (negatives too) is valid there.
    assert config_from_dict({}, [f"advantage.lam={text}"]).advantage.lam == value
    path = tmp_path / "c.yaml"
    path.write_text(f"advantage:\n  lam: {text}\n")
    assert load_config(path).advantage.lam == value
    if value > 0:
        assert config_from_dict({}, [f"optim.lr={text}"]).optim.lr == value
        path.write_text(f"optim:\n  lr: {text}\n  betas: [{text if value < 1 else 0.9}, 0.999]\n")
        assert load_config(path).optim.lr == value


@pytest.mark.parametrize(
    "text, value",
    [("1_000", 1000), ("1e3", 1000), ("1E3", 1000), ("1.5e3", 1500), ("010", 10), ("+7", 7)],
)
def test_int_spellings_in_set_and_yaml(tmp_path, text, value):
    # An exponent is accepted for an int key when the number it spells is a whole number.
    assert config_from_dict({}, [f"train.steps={text}"]).train.steps == value
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  steps: {text}\n")
    assert load_config(path).train.steps == value


@pytest.mark.parametrize(
    "text", ["1e-6", ".5", "-0.2", "1.5", "1e400", "inf", "nan", "0x10", "1:30", "0b11", "1,000"]
)
def test_int_keys_reject_what_is_not_a_whole_number(tmp_path, text):
    message = "config.train.steps must be int, got "
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict({}, [f"train.steps={text}"])
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  steps: {text}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path)


@pytest.mark.parametrize("text", ["4e-4x", "1,5", "0x10", "1:30", "e-6", "1e", "--1", "1__0"])
def test_float_keys_reject_what_float_does_not_read(text):
    with pytest.raises(ConfigError, match=re.escape("config.optim.lr must be float, got ")):
        config_from_dict({}, [f"optim.lr={text}"])


def test_booleans_none_and_strings_keep_their_type(tmp_path):
    for flag in ("true", "false", "yes", "on"):
        with pytest.raises(ConfigError, match="config.optim.lr must be float, got (True|False)"):
            config_from_dict({}, [f"optim.lr={flag}"])
        with pytest.raises(ConfigError, match="config.train.steps must be int, got (True|False)"):
            config_from_dict({}, [f"train.steps={flag}"])
    with pytest.raises(ConfigError, match="config.train.progress must be bool, got 1"):
        config_from_dict({}, ["train.progress=1"])
    with pytest.raises(ConfigError, match="config.optim.lr must be float, got None"):
        config_from_dict({}, ["optim.lr=null"])
    # A number quoted on purpose in a text setting stays text.
    path = tmp_path / "c.yaml"
    path.write_text(
        'data:\n  answer_field: "1e-6"\n  problem_field: "010"\nmodel:\n  path: "1.5"\n'
    )
    cfg = load_config(path)
    assert (cfg.data.answer_field, cfg.data.problem_field, cfg.model.path) == ("1e-6", "010", "1.5")
    assert config_from_dict({}, ["data.answer_field='4e-4'"]).data.answer_field == "4e-4"
    # A quoted number in a numeric setting is read as the number it spells.
    assert config_from_dict({"optim": {"lr": "4e-4"}}).optim.lr == 4e-4
    assert config_from_dict({"train": {"steps": "1_000"}}).train.steps == 1000


def test_bad_explicit_yaml_tag_names_the_file(tmp_path):
    path = tmp_path / "tag.yaml"
    path.write_text("train:\n  steps: !!int ten\n")
    with pytest.raises(ConfigError, match=r"tag\.yaml: not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"--set 'train.steps=!!float x': value is not valid"):
        config_from_dict({}, ["train.steps=!!float x"])
    assert config_from_dict({}, ["train.steps=!!int 0x10"]).train.steps == 16  # YAML's own tag


def test_huge_ints_meet_their_rule_without_overflow():
    # math.isfinite(10**400) raises OverflowError: only floats are checked for finiteness.
    big = 10**400
    assert config_from_dict({}, [f"optim.warmup_steps={big}"]).optim.warmup_steps == big
    with pytest.raises(
        ConfigError, match=re.escape("config.train.seed must be in [0, 4294967296)")
    ):
        config_from_dict({}, [f"train.seed={big}"])
    with pytest.raises(ConfigError, match=re.escape("config.optim.lr must be a finite number")):
        config_from_dict({}, [f"optim.lr={big}"])
