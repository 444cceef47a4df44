"""Shared benchmark plumbing.

Each suite defines ``SIZES`` (what `pytest benchmarks/ --benchmark-only` times) and ``SMOKE_SIZES``
(what CI runs with --benchmark-disable: every benchmark body once, small, so the suites never rot;
--smoke-sizes times them).
A test that takes a ``size`` argument is parametrized over the one that fits the run.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """A stated thread count: tiny models run best on one thread (and share the CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_addoption(parser):
    parser.addoption(
        "--smoke-sizes", action="store_true",
        help="time SMOKE_SIZES instead of SIZES (benchmarks/gpu_check.py's CPU rehearsal)",
    )  # fmt: skip


def pytest_generate_tests(metafunc):
    if "size" not in metafunc.fixturenames:
        return
    smoke = metafunc.config.getoption("benchmark_disable", False)
    smoke = smoke or metafunc.config.getoption("smoke_sizes", False)
    sizes = metafunc.module.SMOKE_SIZES if smoke else metafunc.module.SIZES
    metafunc.parametrize("size", sizes, ids=[str(s) for s in sizes])


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def in_fresh_process(script: str, *args) -> dict:
    """Run ``python script *args`` and return the JSON dict on its last line of output (a fresh
    process per measurement: clean peak memory, no state shared with other variants)."""
    cmd = [sys.executable, script, *map(str, args)]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])
