"""What a run shows: metrics.jsonl (one line per step), a live progress bar, PNG plots.

    log = MetricsLogger(out_dir / "metrics.jsonl", resume_step=None)
    log.write({"step": 1, "reward": 0.5, ...})
    plot_run(out_dir / "metrics.jsonl", out_dir / "curves.png")
    plot_comparison({"orm": path_a, "papo": path_b}, out / "comparison.png")

A new run never overwrites a file that holds metrics. On resume the file keeps the lines up to
the checkpoint's step and drops the rest (they are recomputed), so a resumed run's file reads like
an uninterrupted one's; that rewrite is atomic. A partial last line (a run killed mid-write, a
full disk) is dropped with a warning; any other line that is not a JSON object is an error that
names the file and the line.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch

from papo_fast.distributed import all_reduce
from papo_fast.run_dir import write_text_atomic

# (key, title) of the panels, in order; missing keys are skipped
PANELS = [
    ("accuracy", "train accuracy"),
    ("eval_accuracy", "held-out accuracy (avg@k)"),
    ("zero_adv_frac", "zero-advantage fraction"),
    ("proc_active_frac", "groups with active A_proc"),
    ("process_mean", "rubric score of correct responses"),
    ("response_len", "response length (tokens)"),
    ("entropy", "entropy"),
    ("grad_norm", "grad norm"),
]
BAR_KEYS = ("reward", "accuracy", "zero_adv_frac", "proc_active_frac", "response_len")


ROLLOUT_SUMS = ("n", "outcome", "correct", "process", "tokens", "finished", "zero_adv")
ROLLOUT_SUMS += ("zero_adv_all_correct", "zero_adv_all_wrong")
ROLLOUT_SUMS += ("proc_active", "groups", "judge_calls", "judge_invalid")


def zero_adv_counts(advantages, correct, group_ids) -> tuple[int, int, int]:
    """(responses whose advantage is exactly 0, those of them whose group is all correct, those
    whose group is all wrong). The rest sit in groups of mixed outcome: equal shaped rewards, or
    an advantage that cancels exactly."""
    adv = torch.as_tensor(advantages).detach().cpu()
    ok = torch.as_tensor(correct, dtype=torch.bool).cpu()
    _, slot = torch.unique(torch.as_tensor(group_ids).cpu(), return_inverse=True)
    size = torch.bincount(slot)
    right = torch.bincount(slot, weights=ok.double(), minlength=len(size))
    zero = adv == 0
    all_correct, all_wrong = (right == size)[slot], (right == 0)[slot]
    return int(zero.sum()), int((zero & all_correct).sum()), int((zero & all_wrong).sum())


def rollout_metrics(samples, rewards, stats: dict, advantages, group_ids) -> dict:
    """A step's rollout and reward metrics over all ranks: each rank's sums are summed, the
    least advantage of a correct response is the least of the ranks'.

    ``rewards``: the step's compute_rewards result; ``stats``: papo_advantages' statistics, with
    the ``advantages`` [N] of the responses in groups ``group_ids`` [N]. The responses with a zero
    advantage are split by cause: ``zero_adv_all_correct_frac`` + ``zero_adv_all_wrong_frac`` +
    ``zero_adv_other_frac`` == ``zero_adv_frac`` (fractions of all responses)."""
    st = {k: float(v) for k, v in stats.items()}
    n, groups = len(samples), st["num_groups"]
    local = [
        n, sum(rewards.outcome), sum(rewards.correct), sum(rewards.process),
        sum(len(s.response_ids) for s in samples), sum(s.finished for s in samples),
        *zero_adv_counts(advantages, rewards.correct, group_ids),
        round(st["proc_active_frac"] * groups) if groups else 0,
        groups, rewards.judge_calls, rewards.judge_invalid,
    ]  # fmt: skip
    tot = dict(zip(ROLLOUT_SUMS, all_reduce(local, "sum"), strict=True))
    (adv_min,) = all_reduce([st["correct_adv_min"]], "min")
    n, correct, nan = tot["n"], tot["correct"], float("nan")
    return {
        "reward": tot["outcome"] / n,
        "accuracy": correct / n,
        "process_mean": tot["process"] / correct if correct else nan,
        "zero_adv_frac": tot["zero_adv"] / n,
        "zero_adv_all_correct_frac": tot["zero_adv_all_correct"] / n,
        "zero_adv_all_wrong_frac": tot["zero_adv_all_wrong"] / n,
        "zero_adv_other_frac": (
            tot["zero_adv"] - tot["zero_adv_all_correct"] - tot["zero_adv_all_wrong"]
        )
        / n,
        "proc_active_frac": tot["proc_active"] / tot["groups"] if tot["groups"] else nan,
        "correct_adv_min": adv_min,
        "response_len": tot["tokens"] / n,
        "finished_frac": tot["finished"] / n,
        "judge_calls": int(tot["judge_calls"]),
        "judge_invalid": int(tot["judge_invalid"]),
    }


def _natural(value: str):
    """Sort key: numbers by value, before any text."""
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def group_accuracy(field: str | None, all_groups: list, groups: list, correct) -> dict:
    """``eval_accuracy/<field>=<value>`` per value of ``all_groups`` (every held-out prompt's
    value: the same list on every rank), over all ranks' responses (``groups``, ``correct``: this
    rank's), in the order of the values; {} without a field."""
    if not field:
        return {}
    keys = sorted(set(all_groups), key=_natural)
    local = []
    for key in keys:
        hits = [bool(c) for g, c in zip(groups, correct, strict=True) if g == key]
        local += [len(hits), sum(hits)]
    tot = all_reduce(local, "sum") if local else []
    nan = float("nan")
    return {
        f"eval_accuracy/{field}={key}": c / m if m else nan
        for key, m, c in zip(keys, tot[0::2], tot[1::2], strict=True)
    }


class MetricsLogger:
    """Appends one JSON line per record and flushes it (a kill loses nothing written)."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            if self.path.exists() and self.path.stat().st_size > 0:
                raise ValueError(
                    f"{self.path} already holds metrics; a new run does not overwrite them "
                    "(resume that run, or log to another file)"
                )
            self.path.touch()
        elif self.path.exists():
            keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl, in order (see the module docstring for damaged files)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a metrics file (byte {err.start} is not UTF-8)") from None
    lines = text.split("\n")  # the last item is "" when the file ends with a newline
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # no newline after it: a write that was cut short
                warnings.warn(
                    f"{path}:{number}: dropped a partial last line ({len(line)} characters, "
                    "no newline): the run stopped while writing it",
                    stacklevel=2,
                )
                break
            raise ValueError(
                f"{path}:{number}: not a JSON line ({err.msg}, column {err.colno}): {line[:80]!r}"
            ) from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: not a JSON object: {line[:80]!r}")
        out.append(record)
    return out


class ProgressBar:
    """tqdm over the steps with the main metrics as a postfix (silent when disabled)."""

    def __init__(
        self, total: int, initial: int = 0, desc: str = "train", enabled: bool = True, position=0
    ):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc=desc, dynamic_ncols=True, position=position
            )

    def update(self, metrics: dict) -> None:
        if self.bar is None:
            return
        post = {k: f"{metrics[k]:.3g}" for k in BAR_KEYS if k in metrics}
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _series(records: list[dict], key: str):
    pts = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
    pts = [(s, v) for s, v in pts if not (isinstance(v, float) and math.isnan(v))]
    return [s for s, _ in pts], [v for _, v in pts]


def moving_mean(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def plot_comparison(runs: dict[str, str | Path], out_png: str | Path, smooth: int = 5) -> Path:
    """One panel per main metric, one line per run (a moving average over ``smooth`` steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {name: read_metrics(p) for name, p in runs.items()}
    panels = [(k, t) for k, t in PANELS if any(_series(r, k)[0] for r in data.values())]
    cols = 4
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels, strict=False):
        for name, records in data.items():
            steps, values = _series(records, key)
            if not steps:
                continue
            marker = "o" if key.startswith("eval_") else None
            window = 1 if key.startswith("eval_") else smooth
            ax.plot(steps, moving_mean(values, window), label=name, marker=marker)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if len(runs) > 1 and panels:
        axes.flat[0].legend()
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def plot_run(metrics_path: str | Path, out_png: str | Path, smooth: int = 5) -> Path:
    """The main curves of one run."""
    return plot_comparison({Path(metrics_path).parent.name: metrics_path}, out_png, smooth)
