"""The main job end to end at toy size: warm-up, the ORM / PAPO sweep, tables, summary.json,
plots."""

import json
import math

import pytest

from papo_fast.tasks.demo import WarmupConfig, heldout_split, run_demo
from papo_fast.tasks.demo_report import aggregate, format_tables, mean_sem

pytestmark = pytest.mark.usefixtures("one_thread")


WC = WarmupConfig(
    hidden_size=64, layers=1, steps=3, batch_size=8, num_train=32, heldout_per_length=1,
    heldout_ops=(2, 3),
)  # fmt: skip
OVERRIDES = [
    "train.steps=2",
    "train.prompts_per_step=2",
    "rollout.group_size=4",
    "rollout.max_new_tokens=8",
    "train.eval_every=1",
    "train.eval_prompts=2",
    "train.eval_k=2",
    "train.progress=false",
]
LRS = (1e-3, 2e-3)


def test_demo_end_to_end_small(tmp_path):
    summary = run_demo(tmp_path, OVERRIDES, seeds=2, lrs=LRS, wc=WC, workers=1)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["settings"]["learning_rates"] == list(LRS)
    assert len(on_disk["runs"]) == 2 * 2 * 2  # methods x rates x seeds
    for name, run in on_disk["runs"].items():
        assert run["steps"] == 2
        assert (tmp_path / name / "curves.png").is_file()
        assert (tmp_path / name / "checkpoints" / "latest").is_file()
        for key in ("heldout/eval_accuracy", "heldout_start/eval_accuracy",
                    "heldout/eval_accuracy/ops=2", "heldout/eval_accuracy/ops=3",
                    "last_quarter/zero_adv_frac", "total/judge_calls"):  # fmt: skip
            assert key in run, (name, key)
        causes = ("zero_adv_all_correct_frac", "zero_adv_all_wrong_frac", "zero_adv_other_frac")
        split = sum(run[f"last_quarter/{k}"] for k in causes)
        assert split == pytest.approx(run["last_quarter/zero_adv_frac"], abs=1e-12)
    for mode in ("orm", "papo"):
        for lr in ("1e-03", "2e-03"):
            agg = on_disk["aggregate"][mode][lr]
            assert agg["seeds"] == 2
            seeds = [r for r in on_disk["runs"].values() if r["mode"] == mode and
                     f"{r['lr']:.0e}" == lr]  # fmt: skip
            m, e = mean_sem([r["heldout/eval_accuracy"] for r in seeds])
            assert agg["mean"]["heldout/eval_accuracy"] == pytest.approx(m)
            assert agg["sem"]["heldout/eval_accuracy"] == pytest.approx(e, nan_ok=True)
    assert (tmp_path / "sweep.png").is_file()
    assert (tmp_path / "warmup" / "model.safetensors").is_file()
    table = format_tables(summary["runs"], summary["aggregate"])
    assert "papo" in table and "ops=3" in table and "±" in table


def test_demo_runs_again_on_the_same_out(tmp_path):
    """`make demo` twice: the second demo replaces the first one's runs instead of refusing them
    (a training run never overwrites another; the demo owns the runs it made)."""
    run_demo(tmp_path, OVERRIDES, seeds=1, lrs=LRS[:1], wc=WC, workers=1)
    (tmp_path / "notes.txt").write_text("mine")
    summary = run_demo(
        tmp_path, ["train.steps=1", *OVERRIDES[1:]], seeds=1, lrs=LRS[:1], wc=WC, workers=1
    )
    assert summary["runs"]["papo_lr1e-03_seed0"]["steps"] == 1
    lines = (tmp_path / "papo_lr1e-03_seed0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1]
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only the demo's own runs go


def test_heldout_split_has_every_length_equally():
    rows = heldout_split(WarmupConfig(heldout_per_length=3, heldout_ops=(2, 6)))
    assert sorted(r["ops"] for r in rows) == [k for k in range(2, 7) for _ in range(3)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seeds": 0}, "--seeds"),
        ({"lrs": ()}, "--lrs"),
        ({"lrs": (1e-3, -1e-3)}, "--lrs"),
        ({"lrs": (1e-3, math.inf)}, "--lrs"),
        ({"lrs": (1e-3, 1e-3)}, "twice"),
    ],
)
def test_demo_bad_settings_fail_before_the_warm_up(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_demo(tmp_path / "out", OVERRIDES, wc=WC, workers=1, **kwargs)
    assert not (tmp_path / "out").exists()


def test_demo_refuses_a_learning_rate_override(tmp_path):
    with pytest.raises(ValueError, match="--lrs"):
        run_demo(tmp_path, [*OVERRIDES, "optim.lr=1e-3"], wc=WC, workers=1)


def test_mean_sem_and_aggregate():
    assert mean_sem([1.0, 3.0]) == pytest.approx((2.0, 1.0))  # std sqrt(2), / sqrt(2)
    m, e = mean_sem([0.5])
    assert m == 0.5 and math.isnan(e)
    assert mean_sem([1.0, float("nan"), 3.0]) == pytest.approx((2.0, 1.0))
    runs = {
        "a": {"mode": "orm", "lr": 1e-3, "seed": 0, "x": 1.0},
        "b": {"mode": "orm", "lr": 1e-3, "seed": 1, "x": 2.0},
        "c": {"mode": "papo", "lr": 1e-3, "seed": 0, "x": 5.0},
    }
    agg = aggregate(runs)
    assert agg["orm"]["1e-03"]["mean"]["x"] == 1.5 and agg["orm"]["1e-03"]["seeds"] == 2
    assert agg["papo"]["1e-03"]["mean"]["x"] == 5.0


def test_a_bad_setting_is_named_before_the_learning_rate_override(tmp_path):
    from papo_fast.config import ConfigError

    with pytest.raises(ConfigError, match="data.answer_field"):
        run_demo(tmp_path, [*OVERRIDES, "optim.lr=null", "data.answer_field=null"], wc=WC)
