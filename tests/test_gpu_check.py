"""benchmarks/gpu_check.sh rehearsed on the CPU: its arguments, and the JSON and markdown its
--dry-run writes (the same pipeline as on a GPU, on tiny sizes). The install stage is skipped here:
it would reinstall the package into the environment the tests run in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STAGES = ["install", "references", "cuda_tests", "memory", "benchmarks"]


def gpu_check(*args, timeout=300) -> subprocess.CompletedProcess:
    # the script runs outside pytest on the GPU machine: no sign of this run's xdist worker
    # (pytest-benchmark turns timing off under xdist, and the suites would then record nothing)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHON"] = sys.executable
    return subprocess.run([str(SCRIPT), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


@pytest.mark.parametrize(
    "args, message",
    [
        (["--skip", "install,bench"], "--skip: unknown stage(s) ['bench']"),
        (["--budget", "0"], "--budget must be > 0 seconds, got 0.0"),
        (["--out"], "--out: expected one argument"),
        (["--fast"], "unrecognized arguments: --fast"),
    ],
)
def test_bad_arguments_are_named(tmp_path, args, message):
    res = gpu_check(*args, timeout=60)
    assert res.returncode == 2
    assert message in res.stderr


def test_out_of_budget_stages_are_recorded_as_skipped(tmp_path):
    res = gpu_check("--dry-run", "--out", tmp_path, "--budget", "1", timeout=60)
    assert res.returncode == 0, res.stderr
    result = json.loads((tmp_path / "results.json").read_text())
    assert [s["name"] for s in result["stages"]] == STAGES
    assert all(s["status"] == "skipped" and "out of time" in s["detail"] for s in result["stages"])
    assert "| install | skipped |" in (tmp_path / "results.md").read_text()


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    res = gpu_check("--dry-run", "--out", out, "--skip", "install")
    return res, out


def test_rehearsal_runs_every_stage(rehearsal):
    res, out = rehearsal
    assert res.returncode == 0, res.stdout + res.stderr
    result = json.loads((out / "results.json").read_text())
    assert result["schema"] == 1 and result["mode"] == "dry-run"
    assert [(s["name"], s["status"]) for s in result["stages"]] == [
        ("install", "skipped"),
        *((name, "ok") for name in STAGES[1:]),
    ]
    assert {p.name for p in out.iterdir()} == {
        "results.json", "results.md", "gpu_check.log", "cuda_tests.xml",
        "bench_advantages.json", "bench_policy_loss.json", "bench_fused_linear.json",
        "bench_logits_loss.json",
    }  # fmt: skip


def test_rehearsal_json_holds_every_benchmark_and_its_roofline(rehearsal):
    _, out = rehearsal
    result = json.loads((out / "results.json").read_text())
    variants = {(b["suite"], b["variant"]) for b in result["benchmarks"]}
    assert variants == {
        ("bench_advantages.py", "papo_fast"), ("bench_advantages.py", "released_loop"),
        *(("bench_policy_loss.py", v) for v in ("eager", "compiled", "ours")),
        *(("bench_fused_linear.py", v) for v in ("floor", "naive", "liger", "ours")),
        *(("bench_logits_loss.py", v) for v in ("eager", "liger", "ours")),
    }  # fmt: skip
    assert all(b["min_s"] > 0 and b["rounds"] >= 1 for b in result["benchmarks"])
    ops = [r["op"] for r in result["rooflines"]]
    assert ops == [
        "papo_advantages", "policy_loss fwd+bwd, local counts", "fused_linear_policy_loss fwd+bwd"
    ]  # fmt: skip
    for r in result["rooflines"]:
        assert 0 < r["floor_min_s"] <= r["floor_ours_s"] and r["x_floor"] > 1
    tests = result["cuda_tests"]  # on the CPU every CUDA test is collected, then skipped
    assert tests["tests"] > 0 and tests["skipped"] == tests["tests"]


def test_rehearsal_memory_matches_its_formula(rehearsal):
    _, out = rehearsal
    mem = json.loads((out / "results.json").read_text())["memory"]
    # the formula leaves out 0-dim and [B]-long tensors: tests/test_memory_fused_linear.py
    assert 0 <= mem["measured_ours_bytes"] - mem["formula_cpu_bytes"] <= 16 * 1024
    assert mem["measured_liger_bytes"] > 0


def test_rehearsal_markdown_has_a_row_per_json_entry(rehearsal):
    _, out = rehearsal
    result = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    for heading in ("## Stages", "## Benchmarks", "## Against the roofline", "## Peak memory"):
        assert heading in md
    rows = [line for line in md.splitlines() if line.startswith("| bench_")]
    assert len(rows) == len(result["benchmarks"])
    assert sum(line.startswith("| papo_fast, ") for line in md.splitlines()) == 2
