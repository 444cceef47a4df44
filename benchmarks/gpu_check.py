"""One prepared run on a machine with one GPU: install, the CUDA tests, the reference rates, the
kernel suites against their baselines, peak memory against liger-kernel; a JSON and a markdown
summary written to the output folder. benchmarks/gpu_check.sh is the entry point.

Stages, in order, each under its own time limit cut to what is left of the whole budget (a stage
that finds no time is recorded as skipped, never silently dropped):

    install      carried wheels (``--wheels``: packages the machine lacks, liger-kernel) into a
                 private folder on PYTHONPATH, then this package in editable mode, no downloads;
                 then the versions of every module the later stages import
    references   the device's copy bandwidth and bf16 matrix-product rate, measured
    cuda_tests   the tests marked ``cuda`` (junit XML kept)
    memory       fused_linear_policy_loss's peak against liger's and against its formula
                 (benchmarks/memory_fused_linear.py)
    benchmarks   bench_advantages / bench_policy_loss / bench_fused_linear / bench_logits_loss
                 against their baselines (pytest-benchmark JSON kept, one per suite), joined with
                 benchmarks/roofline.py; last, as the one stage that can use any time left

``--dry-run`` rehearses the same pipeline on the CPU on tiny inputs (the suites' SMOKE_SIZES,
the memory check at a small size): the same stages, the same files, the same JSON and markdown
shape; its figures mean nothing. Files written: results.json, results.md, gpu_check.log,
cuda_tests.xml and one JSON per suite (bench_advantages.json, ...).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import roofline  # beside this file: a script's folder is on sys.path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCHEMA = 1
STAGES = ("install", "references", "cuda_tests", "memory", "benchmarks")
SUITES = (
    "bench_advantages.py",
    "bench_policy_loss.py",
    "bench_fused_linear.py",
    "bench_logits_loss.py",
)
MODULES = ("torch", "triton", "numpy", "pytest", "pytest_benchmark", "liger_kernel", "papo_fast")
# seconds per stage (GPU run); the sum is above the budget on purpose: a stage that ends early
# leaves its time to the next ones
LIMITS = {"install": 90, "references": 60, "cuda_tests": 150, "memory": 120, "benchmarks": 330}
MEMORY_SIZE = {"cuda": (16, 1024, 4096, 151936), "cpu": (2, 32, 256, 2048)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/gpu_check.sh", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_results"),
                   help="output folder (default: $OUT, else ./gpu_results)")  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help="fewer benchmark rounds (0.05 s of rounds per benchmark)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true",
                   help="rehearse on the CPU: tiny sizes, same stages and outputs")  # fmt: skip
    p.add_argument("--budget", type=float, default=450.0,
                   help="seconds for all stages together (default 450)")  # fmt: skip
    p.add_argument("--wheels", type=Path, default=ROOT / ".whl",
                   help="wheels to install with no index (default ./.whl)")  # fmt: skip
    p.add_argument("--skip", default="", help=f"comma-separated stages to skip, of {STAGES}")
    args = p.parse_args(argv)
    args.skip = {s for s in args.skip.split(",") if s}
    if unknown := args.skip - set(STAGES):
        p.error(f"--skip: unknown stage(s) {sorted(unknown)}; the stages are {', '.join(STAGES)}")
    if args.budget <= 0:
        p.error(f"--budget must be > 0 seconds, got {args.budget}")
    return args


class Run:
    """The stages' shared state: the clock, the child environment, the log, the results."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.out = args, args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + args.budget
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if args.dry_run:
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, even on a machine with a GPU
        self.log = open(self.out / "gpu_check.log", "w")  # noqa: SIM115 (closed by finish)
        self.started = time.monotonic()
        self.results: dict = {
            "schema": SCHEMA, "mode": "dry-run" if args.dry_run else "cuda",
            "quick": args.quick, "budget_s": args.budget,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "stages": [], "env": {}, "cuda_tests": None, "benchmarks": [], "rooflines": [],
            "memory": None,
        }  # fmt: skip

    def sh(self, cmd: list[str], limit: float) -> subprocess.CompletedProcess:
        """Run cmd from the repository root, its output into the log. Past ``limit`` seconds its
        whole process group is killed (the suites start processes of their own) and
        TimeoutExpired raised."""
        self.log.write(f"\n$ {' '.join(map(str, cmd))}\n")
        self.log.flush()
        pipe = subprocess.PIPE
        proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=pipe, stderr=pipe, text=True,
                                start_new_session=True)  # fmt: skip
        out = err = ""
        try:
            out, err = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise
        finally:
            self.log.write(out + err)
            self.log.flush()
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def stage(self, name: str, fn) -> None:
        left = self.deadline - time.monotonic()
        rec = {"name": name, "status": "ok", "seconds": 0.0, "detail": ""}
        if name in self.args.skip:
            rec.update(status="skipped", detail="--skip")
        elif left < 5:
            rec.update(status="skipped", detail=f"out of time ({left:.0f} s of the budget left)")
        else:
            t0 = time.monotonic()
            try:
                rec["detail"] = fn(min(LIMITS[name], left)) or ""
            except subprocess.TimeoutExpired as err:
                rec.update(status="timeout", detail=f"stopped after {err.timeout:.0f} s")
            except Exception as err:  # a failed stage is recorded; the next ones still run
                rec.update(status="failed", detail=f"{type(err).__name__}: {err}"[-2000:])
            rec["seconds"] = round(time.monotonic() - t0, 2)
        self.results["stages"].append(rec)
        print(f"[gpu_check] {name}: {rec['status']} ({rec['seconds']} s) {rec['detail'][:200]}")

    def finish(self) -> None:
        self.results["wall_s"] = round(time.monotonic() - self.started, 2)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1) + "\n")
        (self.out / "results.md").write_text(markdown(self.results))
        self.log.close()


def _error_lines(res: subprocess.CompletedProcess) -> list[str]:
    """The lines of a command's output that name an error, else its last ones."""
    lines = [x.strip() for x in (res.stdout + res.stderr).splitlines() if x.strip()] or ["-"]
    return [x for x in lines if "error" in x.lower()][:4] or lines[-4:]


def _checked(res: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    if res.returncode != 0:
        raise RuntimeError(f"{what} exited {res.returncode}: " + " / ".join(_error_lines(res)))
    return res


# ----------------------------------------------------------------------------- stages


def install(run: Run, limit: float) -> str:
    py, done = sys.executable, []
    wheels = sorted(run.args.wheels.glob("*.whl")) if run.args.wheels.is_dir() else []
    if wheels:
        site = tempfile.mkdtemp(prefix="gpu_check_site_")  # not under --out: results only there
        _checked(run.sh([py, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                         "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site),
                         *map(str, wheels)], limit), "pip install of the wheels")  # fmt: skip
        run.env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, run.env.get("PYTHONPATH")]))
        done.append(f"{len(wheels)} wheel(s) from {run.args.wheels}")
    _checked(run.sh([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                     "--no-index", "-e", "."], limit), "pip install -e .")  # fmt: skip
    done.append("papo_fast (editable)")
    probe = ("import importlib, importlib.metadata as md, json, sys\nv = {}\n"
             "for m in sys.argv[1:]:\n    try:\n        importlib.import_module(m)\n"
             "        v[m] = md.version(m.replace('_', '-'))\n"
             "    except md.PackageNotFoundError:\n        v[m] = 'unversioned'\n"
             "    except Exception:\n        v[m] = None\nprint(json.dumps(v))")  # fmt: skip
    versions = json.loads(_checked(run.sh([py, "-c", probe, *MODULES], limit), "probe").stdout)
    run.results["env"]["modules"] = {k: str(v) if v else None for k, v in versions.items()}
    missing = [m for m, v in versions.items() if v is None]
    if missing:
        raise RuntimeError(f"not importable after the install: {', '.join(missing)} (carry their "
                           f"wheels in {run.args.wheels})")  # fmt: skip
    return "; ".join(done)


REFERENCES = """
import json, sys, time, torch
dev = sys.argv[1]
big = dev == "cuda"
n_copy, n_mm, dtype = (2 * 1024**3, 8192, torch.bfloat16) if big else (2**26, 512, torch.float32)
def timed(fn, reps=10):
    for _ in range(3):
        fn()
    if dev == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if dev == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps
x = torch.empty(n_copy, dtype=torch.uint8, device=dev)
y = torch.empty_like(x)
copy_s = timed(lambda: y.copy_(x))
a = torch.randn(n_mm, n_mm, device=dev).to(dtype)
mm_s = timed(lambda: a @ a)
name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
print(json.dumps({"device": name, "copy_tb_s": 2 * n_copy / copy_s / 1e12, "copy_bytes": n_copy,
                  "matmul_tflop_s": 2 * n_mm**3 / mm_s / 1e12, "matmul_n": n_mm,
                  "matmul_dtype": str(dtype), "torch": torch.__version__}))
"""


def references(run: Run, limit: float) -> str:
    dev = "cpu" if run.args.dry_run else "cuda"
    res = _checked(run.sh([sys.executable, "-c", REFERENCES, dev], limit), "references")
    ref = json.loads(res.stdout.strip().splitlines()[-1])
    run.results["env"]["references"] = ref
    rates = f"copy {ref['copy_tb_s']:.3g} TB/s, matmul {ref['matmul_tflop_s']:.3g} TFLOP/s"
    return f"{ref['device']}: {rates}"


def cuda_tests(run: Run, limit: float) -> str:
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "mark.cuda" in p.read_text())  # fmt: skip
    xml = run.out / "cuda_tests.xml"
    res = run.sh([sys.executable, "-m", "pytest", *files, "-m", "cuda", "-q", "-p",
                  "no:cacheprovider", f"--junitxml={xml}"], limit)  # fmt: skip
    if not xml.exists():
        _checked(res, "pytest -m cuda")
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["files"] = files
    run.results["cuda_tests"] = counts
    if counts["failures"] or counts["errors"]:
        raise RuntimeError(f"{counts['failures']} failed, {counts['errors']} errors of "
                           f"{counts['tests']} (see cuda_tests.xml)")  # fmt: skip
    return f"{counts['passed']} passed, {counts['skipped']} skipped of {counts['tests']}"


def benchmarks(run: Run, limit: float) -> str:
    """Each suite in its own pytest run and JSON file: a suite stopped at the time limit loses
    its own figures only. The stage fails when one suite failed or ran out of time."""
    end, rows, problems = time.monotonic() + limit, [], []
    for suite in SUITES:
        left = end - time.monotonic()
        if left < 5:
            problems.append(f"{suite}: no time left")
            continue
        out = run.out / suite.replace(".py", ".json")
        cmd = [sys.executable, "-m", "pytest", f"benchmarks/{suite}", "-q", "--benchmark-only",
               "-p", "no:cacheprovider", f"--benchmark-json={out}"]  # fmt: skip
        if run.args.dry_run:
            cmd.append("--smoke-sizes")
        if run.args.quick or run.args.dry_run:
            cmd.append("--benchmark-max-time=0.05")
        try:
            res = run.sh(cmd, left)
        except subprocess.TimeoutExpired:
            problems.append(f"{suite}: stopped after {left:.0f} s")
            continue
        if out.exists():  # the rows are kept even when one benchmark of the suite failed
            rows += [bench_row(b) for b in json.loads(out.read_text())["benchmarks"]]
        try:
            _checked(res, suite)
        except RuntimeError as err:
            problems.append(str(err))
    run.results["benchmarks"] = rows
    run.results["rooflines"] = roofline_rows(rows)
    if problems:
        raise RuntimeError("; ".join(problems))
    return f"{len(rows)} benchmarks"


def bench_row(b: dict) -> dict:
    size = b["params"].get("size")
    return {
        "suite": b["fullname"].split("::")[0].rsplit("/", 1)[-1], "name": b["name"],
        "size": tuple(size) if isinstance(size, list) else size,
        "variant": b["params"].get("variant") or b["name"].split("[")[0].removeprefix("test_"),
        "min_s": b["stats"]["min"], "median_s": b["stats"]["median"],
        "rounds": b["stats"]["rounds"], "extra_info": b["extra_info"], "params": b["params"],
    }  # fmt: skip


# The calls roofline.py counts: the suites' default settings (other estimators, loss types and
# rollout corrections are timed beside them, without a roofline of their own).
ROOFLINE_CALLS = {"test_papo_fast": {"estimator": "grpo"},
                  "test_policy_loss": {"loss_type": "ppo", "per_token": False},
                  "test_fused_linear_loss": {}}  # fmt: skip


def roofline_rows(rows: list[dict]) -> list[dict]:
    """Each papo_fast row of a ROOFLINE_CALLS call against roofline.py's count at its size:
    measured / floor."""
    out = []
    for r in rows:
        want = ROOFLINE_CALLS.get(r["name"].split("[")[0])
        if want is None or any((r["params"] or {}).get(k, v) != v for k, v in want.items()):
            continue
        if r["suite"] == "bench_advantages.py" and r["variant"] == "papo_fast":
            line = roofline.advantages(r["size"])
        elif r["suite"] == "bench_policy_loss.py" and r["variant"] == "ours":
            line = roofline.policy_loss(r["size"])
        elif r["suite"] == "bench_fused_linear.py" and r["variant"] == "ours":
            line = roofline.fused_linear(*r["size"])
        else:
            continue
        floor = line.floor_s("ours")
        out.append({
            "op": line.op, "size": line.size, "bytes_min": line.total("minimum", "bytes"),
            "bytes_ours": line.total("ours", "bytes"), "flops": line.total("ours", "flops"),
            "floor_min_s": line.floor_s("minimum"), "floor_ours_s": floor,
            "measured_s": r["min_s"], "x_floor": r["min_s"] / line.floor_s("minimum"),
        })  # fmt: skip
    return out


def memory(run: Run, limit: float) -> str:
    dev = "cpu" if run.args.dry_run else "cuda"
    size = MEMORY_SIZE[dev]
    cmd = [sys.executable, "benchmarks/memory_fused_linear.py", "--json", "--device", dev,
           "--dtype", "bf16", "--size", *map(str, size)]  # fmt: skip
    res = _checked(run.sh(cmd, limit), "memory_fused_linear.py")
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    run.results["memory"] = rep
    mib = lambda k: f"{rep[k] / 2**20:.1f} MiB"  # noqa: E731
    ours, formula = mib("measured_ours_bytes"), mib(f"formula_{dev}_bytes")
    return f"ours {ours} (formula {formula}), liger {mib('measured_liger_bytes')}"


# ----------------------------------------------------------------------------- report


def _t(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} µs"


def _cell(text: str, width: int = 160) -> str:
    """Text for a table cell: one line, no column separators."""
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= width else text[: width - 3] + "..."


def markdown(res: dict) -> str:
    env = res["env"]
    ref = env.get("references") or {}
    lines = [
        f"# gpu_check ({res['mode']}{', quick' if res['quick'] else ''}), {res['started']}", "",
        f"Device: {ref.get('device', '-')}; torch {ref.get('torch', '-')}; "
        f"copy {ref.get('copy_tb_s', 0):.3g} TB/s; matmul {ref.get('matmul_tflop_s', 0):.3g} "
        f"TFLOP/s ({ref.get('matmul_dtype', '-')}). Wall time {res.get('wall_s', 0):.0f} s.", "",
        "## Stages", "", "| stage | status | seconds | detail |", "|---|---|---:|---|",
        *(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {_cell(s['detail'])} |"
          for s in res["stages"]),
        "", "## Benchmarks (minimum over rounds)", "",
        "| suite | size | variant | min | median | rounds |", "|---|---|---|---:|---:|---:|",
        *(f"| {b['suite']} | {b['size']} | {b['variant']} | {_t(b['min_s'])} "
          f"| {_t(b['median_s'])} | {b['rounds']} |" for b in res["benchmarks"]),
        "", "## Against the roofline (H200 figures of benchmarks/roofline.py)", "",
        "| op | size | floor (minimum bytes) | floor (our passes) | measured | x floor |",
        "|---|---|---:|---:|---:|---:|",
        *(f"| {r['op']} | {r['size']} | {_t(r['floor_min_s'])} | {_t(r['floor_ours_s'])} "
          f"| {_t(r['measured_s'])} | {r['x_floor']:.3g} |" for r in res["rooflines"]),
        "", "## Peak memory of the fused linear loss (bf16, forward + backward)", "",
    ]  # fmt: skip
    mem = res["memory"]
    if mem:
        dev = mem["device"]
        mib = lambda k: f"{mem[k] / 2**20:.1f} MiB"  # noqa: E731
        lines += [
            f"Size {mem['size']}, {dev}.", "", "| | peak above the inputs |", "|---|---:|",
            f"| papo_fast, measured | {mib('measured_ours_bytes')} |",
            f"| papo_fast, formula ({dev} path) | {mib(f'formula_{dev}_bytes')} |",
            f"| liger-kernel, measured | {mib('measured_liger_bytes')} |",
        ]  # fmt: skip
    else:
        lines.append("Not measured (see the memory stage).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    run = Run(args)
    for name in STAGES:
        run.stage(name, lambda limit, n=name: globals()[n](run, limit))
    run.finish()
    bad = [s["name"] for s in run.results["stages"] if s["status"] in ("failed", "timeout")]
    print(f"[gpu_check] wrote {args.out}/results.json and results.md; "
          f"{'failed or timed out: ' + ', '.join(bad) if bad else 'no stage failed'}")  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
