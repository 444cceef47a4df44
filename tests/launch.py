"""Runs of ``papo_fast train`` in fresh processes, on one process or under torchrun, for the tests
of many processes (test_distributed.py, test_vllm.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
EXAMPLE = ROOT / "examples" / "arith_papo.yaml"


def as_sets(values: dict) -> list[str]:
    """``--set key=value`` arguments."""
    return [arg for k, v in values.items() for arg in ("--set", f"{k}={v}")]


def command(nproc: int, args: list[str]) -> list[str]:
    """``python -m papo_fast train`` on one process; under torchrun on ``nproc``."""
    head = [sys.executable, "-m"]
    if nproc > 1:
        head += ["torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m"]
    return [*head, "papo_fast", "train", str(EXAMPLE), *args]


def environment() -> dict:
    """One thread per process; the tests' own modules (tiny_run's verifier) importable."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    return env


def train(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    run = subprocess.run(
        command(nproc, args), env=environment(), capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return run


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_close(a: float, b: float, rel: float, what: str) -> None:
    assert abs(a - b) <= rel * max(abs(a), abs(b)), f"{what}: {a} vs {b} (rel {rel})"
