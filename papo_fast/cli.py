"""The `papo-fast` command.

papo-fast train CONFIG.yaml [--set section.key=value ...] [--resume]
torchrun --nproc-per-node N -m papo_fast train CONFIG.yaml ...   # the same run on N processes
papo-fast demo --out DIR [--seeds N] [--lrs 2e-4,4e-4] [--set section.key=value ...]
papo-fast plot OUT.png RUN_DIR [RUN_DIR ...]      # compare the metrics of finished runs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="papo-fast", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train from a YAML config")
    train.add_argument("config", help="YAML file (see examples/)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")

    demo = sub.add_parser(
        "demo", help="ORM vs PAPO on tiny-model arithmetic over learning rates (CPU, ~8 min)"
    )
    demo.add_argument("--out", default="runs/demo", help="output directory")
    demo.add_argument("--seeds", type=int, default=2, help="RL seeds per method and rate")
    demo.add_argument(
        "--lrs", type=_rates, default=None, help="learning rates, comma-separated (2e-4,4e-4,8e-4)"
    )
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")

    plot = sub.add_parser("plot", help="comparison plot of finished runs")
    plot.add_argument("png")
    plot.add_argument("runs", nargs="+", help="run directories holding metrics.jsonl")
    return p


def _rates(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 2e-4,4e-4, got {text!r}"
        ) from None


def _run_metrics(runs: list[str]) -> dict[str, Path]:
    """Label -> metrics.jsonl of each run directory: its name, or the path as given when two
    runs share a name."""
    for run in map(Path, runs):
        if not run.is_dir():
            raise ValueError(f"run directory not found: {run}")
        if not (run / "metrics.jsonl").is_file():
            raise ValueError(f"no metrics.jsonl in {run} (is it a run's out_dir?)")
    names = [Path(r).name for r in runs]
    unique = len(set(names)) == len(names)
    return {(Path(r).name if unique else r): Path(r) / "metrics.jsonl" for r in runs}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    from papo_fast.config import ConfigError

    hf_logging.disable_progress_bar()  # our own bar shows the training progress
    try:
        if args.command == "train":
            from papo_fast.config import load_config
            from papo_fast.distributed import end_world
            from papo_fast.metrics import plot_run
            from papo_fast.trainer import Trainer

            cfg = load_config(args.config, args.overrides)
            trainer = Trainer(cfg, resume=args.resume)
            try:
                trainer.train()
            finally:
                trainer.backend.close()  # an engine's own process groups go first
                end_world()
            out = Path(cfg.train.out_dir)
            if trainer.world.main:  # under torchrun, rank 0 writes
                plot_run(out / "metrics.jsonl", out / "curves.png")
                print(f"wrote {out}")
        elif args.command == "demo":
            from papo_fast.tasks.demo import DEMO_LRS, run_demo

            run_demo(args.out, args.overrides, seeds=args.seeds, lrs=args.lrs or DEMO_LRS)
        else:
            from papo_fast.metrics import plot_comparison

            png = Path(args.png)
            if png.is_dir():
                raise ValueError(f"plot output {png} is a directory; give a file name (.png)")
            if not png.parent.is_dir():
                raise ValueError(f"plot output directory not found: {png.parent}")
            print(f"wrote {plot_comparison(_run_metrics(args.runs), png)}")
    except (ConfigError, ValueError) as err:
        print(f"papo-fast: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
