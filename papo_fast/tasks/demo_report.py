"""What the demo reports: a summary per run, mean and standard error over the seeds, the tables
and the sweep plot.

    runs = {name: run_summary(metrics_path, mode, lr, seed) for ...}
    agg = aggregate(runs)                  # method -> learning rate -> mean / sem / seeds
    print(format_tables(runs, agg))
    plot_sweep(runs, agg, metrics_paths, "sweep.png")

A run's summary is flat: ``heldout/<key>`` and ``heldout_start/<key>`` are the last and first
held-out evaluations (``heldout/eval_accuracy/ops=5``: chains of 5 operations),
``last_quarter/<key>`` the mean of a training metric over the last quarter of the steps (NaN
steps left out), ``total/<key>`` a counter summed over the run (judge calls, invalid judge
outputs). Every numeric key of the run's metrics is there, the importance weights and the judge
counters included when the run logged them.
"""

from __future__ import annotations

import math
from pathlib import Path

from papo_fast.metrics import moving_mean, read_metrics

COUNTERS = ("judge_calls", "judge_invalid")  # per-step counts: summed over the run
ZERO_ADV = ("zero_adv_all_correct_frac", "zero_adv_all_wrong_frac", "zero_adv_other_frac")

# (summary key, column title) of the main table
COLUMNS = [
    ("heldout_start/eval_accuracy", "held-out start"),
    ("heldout/eval_accuracy", "held-out end"),
    ("last_quarter/accuracy", "train acc"),
    ("last_quarter/zero_adv_frac", "zero-adv"),
    ("last_quarter/zero_adv_all_correct_frac", "all-correct"),
    ("last_quarter/zero_adv_all_wrong_frac", "all-wrong"),
    ("last_quarter/process_mean", "rubric"),
]


def _numbers(record: dict) -> dict:
    return {
        k: float(v)
        for k, v in record.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"
    }


def run_summary(metrics_path: str | Path, mode: str, lr: float, seed: int) -> dict:
    """One run's flat summary (module docstring) from its metrics.jsonl."""
    rows = read_metrics(metrics_path)
    train = [r for r in rows if "zero_adv_frac" in r]
    evals = [r for r in rows if "eval_accuracy" in r]
    out = {"mode": mode, "lr": lr, "seed": seed, "steps": len(train)}
    quarter = train[len(train) - max(1, len(train) // 4) :] if train else []
    keys = {k for r in quarter for k in _numbers(r)}
    for key in sorted(keys):
        vals = [r[key] for r in quarter if key in r and r[key] == r[key]]  # NaN != NaN
        if not key.startswith("eval_") and key not in COUNTERS:
            out[f"last_quarter/{key}"] = sum(vals) / len(vals) if vals else math.nan
    for key in COUNTERS:
        if any(key in r for r in train):
            out[f"total/{key}"] = sum(r.get(key, 0) for r in train)
    if evals:
        for prefix, record in (("heldout_start", evals[0]), ("heldout", evals[-1])):
            for key, value in _numbers(record).items():
                if key.startswith("eval_"):
                    out[f"{prefix}/{key}"] = value
    return out


def mean_sem(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n); NaN for one value), NaN values
    left out."""
    vals = [v for v in values if v == v]
    if not vals:
        return math.nan, math.nan
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, math.nan
    var = sum((v - m) ** 2 for v in vals) / (len(vals) - 1)
    return m, math.sqrt(var / len(vals))


def lr_key(lr: float) -> str:
    return f"{lr:.0e}"


def aggregate(runs: dict[str, dict]) -> dict:
    """method -> learning rate ("2e-04") -> {"seeds": n, "mean": {...}, "sem": {...}} over the
    seeds of every numeric key."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for s in runs.values():
        groups.setdefault((s["mode"], lr_key(s["lr"])), []).append(s)
    out: dict = {}
    for (mode, lr), group in sorted(groups.items(), key=lambda kv: (kv[0][0], float(kv[0][1]))):
        keys = sorted({k for s in group for k in s if k not in ("mode", "lr", "seed")})
        stats = {k: mean_sem([s[k] for s in group if k in s]) for k in keys}
        out.setdefault(mode, {})[lr] = {
            "seeds": len(group),
            "mean": {k: v[0] for k, v in stats.items()},
            "sem": {k: v[1] for k, v in stats.items()},
        }
    return out


def chain_keys(runs: dict[str, dict]) -> list[str]:
    """The held-out accuracy keys per chain length, in order."""
    keys = {k for s in runs.values() for k in s if k.startswith("heldout/eval_accuracy/")}
    return sorted(keys, key=lambda k: float(k.rsplit("=", 1)[1]))


def _fmt(v: float, width: int) -> str:
    return f"{v:>{width}.3f}" if v == v else f"{'-':>{width}}"


def format_tables(runs: dict[str, dict], agg: dict) -> str:
    """Per-seed rows, then mean ± standard error per method and learning rate; then held-out
    accuracy by chain length (means over the seeds)."""
    w = 15
    head = f"{'method':<6}{'lr':>8}{'seed':>6}" + "".join(f"{t:>{w}}" for _, t in COLUMNS)
    lines = ["per seed (train figures: means over the last quarter of the steps)", head]
    for s in sorted(runs.values(), key=lambda s: (s["mode"], s["lr"], s["seed"])):
        cells = "".join(_fmt(s.get(k, math.nan), w) for k, _ in COLUMNS)
        lines.append(f"{s['mode']:<6}{s['lr']:>8.0e}{s['seed']:>6}" + cells)
    lines += ["", "mean ± standard error over the seeds", head.replace("  seed", "     n")]
    for mode, by_lr in agg.items():
        for lr, a in by_lr.items():
            cells = ""
            for k, _ in COLUMNS:
                m, e = a["mean"].get(k, math.nan), a["sem"].get(k, math.nan)
                cell = f"{m:.3f}±{e:.3f}" if e == e else (f"{m:.3f}" if m == m else "-")
                cells += f"{cell:>{w}}"
            lines.append(f"{mode:<6}{float(lr):>8.0e}{a['seeds']:>6}" + cells)
    chains = chain_keys(runs)
    if chains:
        titles = [k.rsplit("/", 1)[1] for k in chains]
        lines += ["", "held-out accuracy by chain length (mean over the seeds)"]
        lines.append(f"{'method':<6}{'lr':>8}" + "".join(f"{t:>10}" for t in titles))
        for mode, by_lr in agg.items():
            for lr, a in by_lr.items():
                cells = "".join(_fmt(a["mean"].get(k, math.nan), 10) for k in chains)
                lines.append(f"{mode:<6}{float(lr):>8.0e}" + cells)
    return "\n".join(lines)


def _curve(records: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records if key in r and r[key] == r[key]}


def plot_sweep(runs: dict, agg: dict, metrics: dict, out_png: str | Path, smooth: int = 10):
    """Four panels: held-out accuracy against the learning rate (each seed a dot, the mean a
    line); the zero-advantage fraction of the last quarter split by cause; training accuracy over
    the steps (mean over the seeds, the seeds' range shaded); held-out accuracy by chain length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"orm": "tab:blue", "papo": "tab:red"}
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (acc_ax, zero_ax), (train_ax, chain_ax) = axes
    for mode, by_lr in agg.items():
        c = colors.get(mode)
        lrs = [float(lr) for lr in by_lr]
        for s in (s for s in runs.values() if s["mode"] == mode):
            acc_ax.plot(s["lr"], s.get("heldout/eval_accuracy", math.nan), "o", color=c, alpha=0.4)
        acc_ax.plot(lrs, [a["mean"].get("heldout/eval_accuracy") for a in by_lr.values()],
                    "-", color=c, label=mode)  # fmt: skip
        for key, style in zip(ZERO_ADV[:2], ("-", "--"), strict=True):
            vals = [a["mean"].get(f"last_quarter/{key}", math.nan) for a in by_lr.values()]
            cause = key.removeprefix("zero_adv_").removesuffix("_frac").replace("_", "-")
            zero_ax.plot(lrs, vals, style, marker="o", color=c, label=f"{mode}, {cause}")
        for i, (lr, a) in enumerate(by_lr.items()):
            names = [n for n, s in runs.items() if s["mode"] == mode and lr_key(s["lr"]) == lr]
            curves = [_curve(read_metrics(metrics[n]), "accuracy") for n in names]
            steps = sorted(set.intersection(*(set(cv) for cv in curves)))
            if not steps:
                continue
            per_seed = [moving_mean([cv[t] for t in steps], smooth) for cv in curves]
            mean = [sum(v) / len(v) for v in zip(*per_seed, strict=True)]
            style = styles[i % len(styles)]
            train_ax.plot(steps, mean, style, color=c, label=f"{mode} lr {float(lr):.0e}")
            lo = [min(v) for v in zip(*per_seed, strict=True)]
            hi = [max(v) for v in zip(*per_seed, strict=True)]
            train_ax.fill_between(steps, lo, hi, color=c, alpha=0.12)
            chains = chain_keys(runs)
            xs = [float(k.rsplit("=", 1)[1]) for k in chains]
            ys = [a["mean"].get(k, math.nan) for k in chains]
            chain_ax.plot(xs, ys, style, marker="o", color=c, label=f"{mode} lr {float(lr):.0e}")
    lrs = sorted({s["lr"] for s in runs.values()})
    start = [s.get("heldout_start/eval_accuracy", math.nan) for s in runs.values()]
    acc_ax.axhline(mean_sem(start)[0], color="gray", lw=0.8, ls=":", label="start (warm-up)")
    for ax in (acc_ax, zero_ax):
        ax.set_xscale("log")
        ax.set_xticks(lrs, [f"{lr:.0e}" for lr in lrs])
        ax.minorticks_off()
        ax.set_xlabel("learning rate")
    acc_ax.set_title("held-out accuracy at the end (dots: seeds)", fontsize=10)
    zero_ax.set_title("zero-advantage responses, last quarter, by cause", fontsize=10)
    train_ax.set_title(f"train accuracy ({smooth}-step mean; shaded: seeds' range)", fontsize=10)
    train_ax.set_xlabel("step")
    chain_ax.set_title("held-out accuracy by chain length (end)", fontsize=10)
    chain_ax.set_xlabel("operations in the chain")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png
