"""benchmarks/compile_check.py, the ahead-of-time compile check, catches what the interpreter
cannot: it runs on small kernels written to be wrong, in its own process (the compiler, not
TRITON_INTERPRET), for one architecture (sm_90) and few launches, so the test stays fast.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "compile_check.py"

# Kernel modules as the check sees them: kernels, LAUNCH_SPACE, example_launch (CPU tensors; the
# check records the launches instead of running them).
MODULES = {
    # A float assigned to a variable that entered the loop as an int: the interpreter runs it (it
    # is Python), the compiler refuses a loop-carried variable that changes type.
    "cc_loop_type": """
        @triton.jit
        def _float_in_int_loop_kernel(X, n, BLOCK: tl.constexpr):
            acc = 0
            for _ in range(n):
                acc += 0.5
            tl.store(X + tl.arange(0, BLOCK), tl.zeros([BLOCK], tl.float32) + acc)

        LAUNCH_SPACE = {"block": (16,)}

        def example_launch(block):
            _float_in_int_loop_kernel[(1,)](torch.empty(block), 3, BLOCK=block)
        """,
    # A pipelined product: 4 stages of a [64, BLOCK_K] and a [BLOCK_K, 64] fp16 tile in shared
    # memory. BLOCK_K = 64 takes 128 KiB (fits); 256 takes 256 KiB, over sm_90's 227 KiB.
    "cc_big_tile": """
        @triton.jit
        def _shared_hog_kernel(A, B, C, K, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
            rows = tl.arange(0, BLOCK)
            ks = tl.arange(0, BLOCK_K)
            acc = tl.zeros([BLOCK, BLOCK], tl.float32)
            for k in range(0, K, BLOCK_K):
                a = tl.load(A + rows[:, None] * K + k + ks[None, :])
                b = tl.load(B + (k + ks[:, None]) * BLOCK + rows[None, :])
                acc += tl.dot(a, b)
            tl.store(C + rows[:, None] * BLOCK + rows[None, :], acc)

        LAUNCH_SPACE = {"block_k": (64, 256)}

        def example_launch(block_k):
            x = torch.empty(64 * 1024, dtype=torch.float16)
            _shared_hog_kernel[(1,)](
                x, x, torch.empty(64 * 64), 1024, BLOCK=64, BLOCK_K=block_k, num_stages=4
            )
        """,
    # A kernel no launch reaches, and a switch the space never turns off.
    "cc_uncovered": """
        @triton.jit
        def _never_launched_kernel(X):
            tl.store(X, 1.0)

        @triton.jit
        def _one_sided_kernel(X, SCALE: tl.constexpr):
            tl.store(X, 2.0 if SCALE else 1.0)

        LAUNCH_SPACE = {"scale": (True,)}

        def example_launch(scale):
            _one_sided_kernel[(1,)](torch.empty(1), SCALE=scale)
        """,
}


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("kernel_modules")
    head = "import torch\nimport triton\nimport triton.language as tl\n"
    for name, body in MODULES.items():
        (folder / f"{name}.py").write_text(head + textwrap.dedent(body))
    return folder


def _run_check(folder: Path, modules, timeout: float) -> subprocess.CompletedProcess:
    """The check over ``modules`` (in ``folder``), for sm_90 only, without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), env.get("PYTHONPATH")]))
    args = [arg for name in modules for arg in ("--module", name)]
    cmd = [sys.executable, str(SCRIPT), "--arch", "90", "--jobs", "1", "--timeout", str(timeout)]
    return subprocess.run(
        cmd + args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def check_run(module_dir) -> subprocess.CompletedProcess:
    return _run_check(module_dir, MODULES, timeout=120)


def _failures(run: subprocess.CompletedProcess, kernel: str) -> list[str]:
    """The FAIL messages about ``kernel`` (each FAIL line with its indented detail)."""
    blocks = ("\n" + run.stderr).split("\nFAIL ")[1:]
    return [b for b in blocks if b.startswith(kernel)]


def test_the_check_exits_nonzero_on_a_broken_kernel(check_run):
    assert check_run.returncode == 1, check_run.stdout + check_run.stderr


def test_compile_check_fails_a_float_assigned_to_an_int_loop_variable(check_run):
    (failure,) = _failures(check_run, "_float_in_int_loop_kernel")
    assert "Loop-carried variable acc" in failure and "int32" in failure, failure


def test_compile_check_fails_a_block_over_the_shared_memory_limit(check_run):
    (failure,) = _failures(check_run, "_shared_hog_kernel")  # BLOCK_K = 64 passes
    assert "BLOCK_K=256" in failure
    assert "262144 bytes of shared memory > sm_90's 232448" in failure, failure


def test_compile_check_fails_a_kernel_no_launch_compiles(check_run):
    (failure,) = _failures(check_run, "_never_launched_kernel")
    assert "no launch in cc_uncovered.LAUNCH_SPACE" in failure


def test_compile_check_fails_a_switch_the_space_never_flips(check_run):
    (failure,) = _failures(check_run, "_one_sided_kernel")
    assert "switch SCALE is always True" in failure


def test_compile_check_tables_what_it_compiled(check_run):
    rows = [r for r in check_run.stdout.splitlines() if r.startswith("| _")]
    assert {r.split(" | ")[0] for r in rows} == {
        "| _float_in_int_loop_kernel",
        "| _shared_hog_kernel",
        "| _one_sided_kernel",
    }
    (hog,) = [r for r in rows if r.startswith("| _shared_hog_kernel")]
    assert "| sm_90 | 2 |" in hog  # both BLOCK_K values compiled


def test_compile_check_stops_a_compile_past_its_time_limit(module_dir):
    """A compile still running at the limit (here 0.2 s: the worker is still importing) is
    killed and reported; a hung ptxas ends the same way."""
    run = _run_check(module_dir, ["cc_big_tile"], timeout=0.2)
    assert run.returncode == 1
    failures = _failures(run, "_shared_hog_kernel")
    assert len(failures) == 2 and all("timed out after 0.2 s" in f for f in failures), run.stderr


def _load_check():
    spec = importlib.util.spec_from_file_location("compile_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_covering_points_hold_every_pair_of_values():
    check = _load_check()
    space = {"a": (1, 2, 3), "b": (True, False), "c": ("x", "y", "z", "w"), "d": (None, 0)}
    points = check.covering_points(space)
    for (n, vals), (m, wals) in itertools.combinations(space.items(), 2):
        for v, w in itertools.product(vals, wals):
            assert any(p[n] == v and p[m] == w for p in points), (n, v, m, w)
    assert len(points) < 3 * 2 * 4 * 2  # fewer than the product: 12 pairs of (a, c) at least


def test_heavy_points_vary_the_heavy_dims_at_the_heaviest_corner():
    check = _load_check()
    space = {"dtype": ("f16", "f32"), "kl": (None, "k1"), "block": (16, 1024), "on": (False, True)}
    points = check.heavy_points(space, ("dtype", "kl"))
    assert len(points) == 4
    assert all(p["block"] == 1024 and p["on"] for p in points)
    assert {(p["dtype"], p["kl"]) for p in points} == {("f16", None), ("f16", "k1"),
                                                       ("f32", None), ("f32", "k1")}  # fmt: skip
