"""Property tests of the config loader and the command line over every setting of the dataclasses.

Whatever value any setting is given (of any type, written any way), the outcome is a valid Config
or a ConfigError naming the setting; through `papo-fast` it is exit status 2 with
`papo-fast: error: ...` and no model loaded. The settings are read from the dataclasses, so a
setting added later is covered without touching this file.
"""

import contextlib
import dataclasses
import io
import json
import math
import types
import typing

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from papo_fast.cli import main
from papo_fast.config import CHOICES, Config, ConfigError, config_from_dict, load_config
from papo_fast.tasks.demo import DEMO_RL


def _leaves(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name]


KEYS = dict(_leaves(Config))

# Text that YAML or float() might take for a number, or nearly: the spellings people write.
NUMBER_TEXT = ["1e-6", "1E-6", "4e-4", ".5", "1_000", "-0.2", "1e3", "1.5e3", "010", "+7", "0"]
NUMBER_TEXT += ["0x10", "1:30", "1__0", "1e", "e3", "inf", "-inf", "nan", "1e400", "1,5", " 2 "]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-3, 300),
    st.floats(),
    st.floats(-2, 3),
    st.sampled_from([math.inf, -math.inf, math.nan, 10**400]),
    st.sampled_from(NUMBER_TEXT),
    st.text(alphabet=st.characters(blacklist_characters=":"), max_size=10),
)
any_value = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.text(max_size=5), scalars, max_size=2),
)


def _plausible(key: str, tp) -> st.SearchStrategy:
    """Values of the setting's own type, so that valid configs come up as well as broken ones."""
    section, name = key.rsplit(".", 1)[-2:] if key.count(".") else ("", key)
    if (section, name) in CHOICES:
        return st.sampled_from(CHOICES[(section, name)])
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    out = [st.none()] if len(args) < len(typing.get_args(tp)) else []
    for a in args:
        if a is bool:
            out.append(st.booleans())
        elif a is int:
            out.append(st.integers(0, 64) | st.sampled_from(["1_000", "1e3", "64"]))
        elif a is float:
            out.append(st.floats(0.01, 1.0) | st.sampled_from(["1e-6", "4e-4", ".5", "1E-3"]))
        elif typing.get_origin(a) is tuple:
            out.append(st.lists(st.floats(0, 0.999), min_size=2, max_size=2))
        elif a is dict:
            out.append(st.dictionaries(st.sampled_from(["enable_prefix_caching", "seed"]), scalars))
    return st.one_of(out) if out else any_value


def _value(key: str) -> st.SearchStrategy:
    return st.one_of(_plausible(key, KEYS[key]), any_value)


assignments = st.lists(st.sampled_from(sorted(KEYS)), max_size=4, unique=True).flatmap(
    lambda keys: st.fixed_dictionaries({k: _value(k) for k in keys})
)


def _tree(flat: dict) -> dict:
    tree = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _yaml(value) -> str:
    """One-line YAML for --set (flow style, no document end marker)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...")


def _has_type(value, tp) -> bool:
    """``value`` is exactly of the annotation (an int is not a float, a bool not an int), and a
    float is finite."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if typing.get_origin(tp) is tuple:
        return (
            isinstance(value, tuple)
            and len(value) == len(args)
            and all(map(_has_type, value, args))
        )
    if tp is float and type(value) is float:
        return math.isfinite(value)
    return type(value) is tp


def _check(build, keys) -> Config | ConfigError:
    """build() gives a Config whose every number is in range, or a ConfigError naming a key."""
    try:
        cfg = build()
    except ConfigError as err:
        assert any(k in str(err) for k in keys), f"{err} names none of {sorted(keys)}"
        event("invalid")
        return err
    event("valid")
    for key, tp in KEYS.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        assert _has_type(value, tp), f"{key} = {value!r} passed as valid for {tp}"
    # A valid config is its own fixed point: what a checkpoint stores loads back unchanged.
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    return cfg


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(assignments)
def test_loader_from_a_mapping(flat):
    _check(lambda: config_from_dict(_tree(flat)), flat)


@FAST
@given(assignments)
def test_loader_from_set_overrides(flat):
    _check(lambda: config_from_dict({}, [f"{k}={_yaml(v)}" for k, v in flat.items()]), flat)


@FAST
@given(
    st.lists(
        st.tuples(st.sampled_from(sorted(KEYS)), st.sampled_from(NUMBER_TEXT) | st.text()),
        max_size=3,
    )
)
def test_loader_from_raw_set_text(pairs):
    # The raw text after "=" goes through the YAML parser: a parse error names the --set item.
    _check(
        lambda: config_from_dict({}, [f"{k}={text}" for k, text in pairs]), {k for k, _ in pairs}
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "d.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n')
    cfg = root / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(root / "no_model")},
                "data": {"train_path": str(root / "d.jsonl")},
                "train": {"out_dir": str(root / "run")},
            }
        )
    )
    return root


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(assignments)
def test_loader_from_a_yaml_file(workdir, flat):
    path = workdir / "fuzz.yaml"
    path.write_text(yaml.safe_dump(_tree(flat), allow_unicode=True), encoding="utf-8")
    _check(lambda: load_config(path), flat)


def _run(argv) -> tuple[int, str]:
    threads = torch.get_num_threads()  # train.threads is applied before the model would load
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(argv)
    finally:
        torch.set_num_threads(threads)
    return rc, err.getvalue()


# The settings a valid config may fail on before the model: where the data, judge and model are.
REACH = ("data.", "reward.", "model.path")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(assignments)
def test_cli_train(workdir, flat):
    overrides = [f"{k}={_yaml(v)}" for k, v in flat.items()]
    expected = _check(lambda: load_config(workdir / "c.yaml", overrides), flat)
    argv = ["train", str(workdir / "c.yaml")]
    for item in overrides:
        argv += ["--set", item]
    rc, err = _run(argv)
    assert rc == 2 and err.startswith("papo-fast: error: "), err
    if isinstance(expected, ConfigError):
        assert str(expected) in err
    elif not any(k.startswith(REACH) for k in flat):
        assert "is not a directory with a config.json" in err  # stopped before any model loaded


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(assignments)
def test_cli_demo_rejects_every_invalid_setting_before_the_warm_up(workdir, flat):
    overrides = [f"{k}={_yaml(v)}" for k, v in flat.items()]
    expected = _check(lambda: config_from_dict(DEMO_RL, overrides), flat)
    if not isinstance(expected, ConfigError):
        return  # a valid demo config would start the warm-up: minutes, not a config check
    argv = ["demo", "--out", str(workdir / "demo")]
    for item in overrides:
        argv += ["--set", item]
    rc, err = _run(argv)
    assert rc == 2 and err == f"papo-fast: error: {expected}\n"
    assert not (workdir / "demo").exists()
