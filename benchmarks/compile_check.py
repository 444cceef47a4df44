"""Ahead-of-time compile check: every Triton kernel of papo_fast.kernels, compiled for real NVIDIA
targets (sm_80, sm_90, sm_100) without a GPU, at the launches its launcher can make.

    python benchmarks/compile_check.py [--arch 80,90,100] [--jobs N] [--markdown FILE]

The interpreter the tests use runs a kernel's Python, never the compiler: a variable whose type
changes inside a loop, a tile too large for shared memory or register spills show up only here.

1. **Kernels are found, not listed.** Every ``triton.jit`` function of the scanned modules must be
   compiled: launched by its module's ``example_launch``, or called by a kernel that is.
2. **Launches come from the launchers.** A module with kernels declares ``LAUNCH_SPACE`` (its
   launcher's inputs: dtypes, switches, sizes crossing each block threshold, each dimension's
   heaviest value last), optionally ``HEAVY_DIMS`` (default: dtype), and
   ``example_launch(**point)``, which calls the real launcher on small CPU tensors. Each kernel's
   ``run`` is replaced by a recorder, so what a launcher would launch (heuristics applied,
   num_warps, constexprs) is recorded, and Triton's own binder turns it into the signature and
   the specializations the runtime would compile (integers equal to 1 or divisible by 16, 16-byte
   aligned pointers). A boolean switch seen only one way fails: the space misses an input.
3. **Which points.** The full product is out of reach (the policy loss's space has 2.4M points),
   so: every pair of values of any two dimensions in at least one point (a greedy covering
   array), plus every combination of HEAVY_DIMS with every other dimension at its heaviest value
   (the most registers, where spills appear).
4. **Compiled for real.** Each distinct compile runs in a worker process under a time limit (ptxas
   can hang), with a fresh Triton cache so that ptxas really runs. Registers and spills come from
   ptxas's own log, shared memory from the compiled metadata.

The check fails on a compile error or time-out, spill stores over SPILL_BUDGET, shared memory over
the architecture's per-block limit, or registers x threads over the 64K-register file.
"""

from __future__ import annotations

import argparse
import ast
import collections
import contextlib
import datetime
import functools
import importlib
import io
import itertools
import multiprocessing as mp
import multiprocessing.connection
import os
import pkgutil
import re
import shutil
import sys
import tempfile
import time
import warnings

# The script and its worker processes, not an import of it (a test's): the compiler, not the
# interpreter (before triton is imported); and no word on Triton 3.9's coming fp-fusion default
# (the check compiles with the default the runtime uses, whichever it is).
if __name__ in ("__main__", "__mp_main__"):
    os.environ.pop("TRITON_INTERPRET", None)
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")

ARCHS = (80, 90, 100)
# Opt-in shared memory per block: CUDA's table of compute capabilities 8.0, 9.0 and 10.0 (CUTLASS
# spells the last two sm90/sm100_smem_capacity_bytes = 232448).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}
REGISTER_FILE = 64 * 1024  # 32-bit registers per block on all three: registers x threads must fit
# Spill stores per thread, in bytes: four registers. A spill goes to L1-cached local memory, and
# each thread of these memory-bound kernels moves tens to hundreds of bytes of HBM per program;
# BENCHMARKS.md ("Ahead-of-time compile check") lists the spills found and what they cost.
SPILL_BUDGET = 16


# ----------------------------------------------------------------------------- kernels


def jit_functions(module) -> dict:
    """name -> JITFunction for every triton.jit function defined in ``module`` (heuristics and
    autotuners unwrapped)."""
    from triton.runtime.jit import JITFunction

    found = {}
    for obj in vars(module).values():
        while not isinstance(obj, JITFunction) and hasattr(obj, "fn"):  # Heuristics, Autotuner
            obj = obj.fn
        if isinstance(obj, JITFunction) and obj.module == module.__name__:
            found[obj.__name__] = obj
    return found


def called_jit_functions(fn) -> set:
    """The JITFunctions that ``fn`` calls, directly or through each other."""
    from triton.runtime.jit import JITFunction

    seen, todo = set(), [fn]
    while todo:
        f = todo.pop()
        for node in ast.walk(ast.parse(f.src)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                callee = f.__globals__.get(node.func.id)
                if isinstance(callee, JITFunction) and callee not in seen:
                    seen.add(callee)
                    todo.append(callee)
    return seen


def covering_points(space: dict) -> list[dict]:
    """Points of ``space`` (name -> values) holding every pair of values of any two dimensions at
    least once: greedy, deterministic (ties go to the lighter value)."""
    names, sizes = list(space), [len(v) for v in space.values()]
    if len(names) < 2:
        return [dict(zip(names, p, strict=True)) for p in itertools.product(*space.values())]
    pairs = list(itertools.combinations(range(len(names)), 2))
    todo = {(i, a, j, b) for i, j in pairs for a in range(sizes[i]) for b in range(sizes[j])}
    rows = []
    while todo:
        i, a, j, b = min(todo)
        row = {i: a, j: b}
        for k in range(len(names)):
            if k not in row:
                gain = lambda v, k=k, row=row, todo=todo: sum(
                    ((m, row[m], k, v) if m < k else (k, v, m, row[m])) in todo for m in row
                )
                row[k] = max(range(sizes[k]), key=gain)
        todo -= {(i, row[i], j, row[j]) for i, j in pairs}
        rows.append(row)
    return [{names[k]: space[names[k]][v] for k, v in sorted(r.items())} for r in rows]


def heavy_points(space: dict, heavy_dims: tuple) -> list[dict]:
    """Every combination of ``heavy_dims``, each other dimension at its heaviest (last) value."""
    corner = {name: values[-1] for name, values in space.items()}
    combos = itertools.product(*(space[d] for d in heavy_dims))
    return [corner | dict(zip(heavy_dims, c, strict=True)) for c in combos]


def _record(fn, launches, point, *args, grid, warmup, **kwargs):
    launches.append((fn, args, kwargs, dict(point)))


def _skip(*args, **kwargs) -> None:
    """A kernel of another module launched by a launcher under check: compiled at its own
    module's launches, not run here."""


def record_launches(module, kernels: dict, others: list = ()) -> list:
    """(kernel, args, kwargs, point) of every launch ``module.example_launch`` makes over the
    points of its LAUNCH_SPACE; ``others``, kernels of other modules its launchers may launch
    too, are neither run nor recorded."""
    launches, point = [], {}
    space = module.LAUNCH_SPACE
    heavy = getattr(module, "HEAVY_DIMS", ("dtype",) if "dtype" in space else ())
    if set(heavy) - set(space):
        raise ValueError(f"{module.__name__}.HEAVY_DIMS {heavy}: not all in LAUNCH_SPACE")
    points = covering_points(space) + heavy_points(space, heavy)
    for fn in kernels.values():
        fn.run = functools.partial(_record, fn, launches, point)
    for fn in others:
        fn.run = _skip
    try:
        for p in points:
            point.clear()
            point.update(p)
            try:
                module.example_launch(**p)
            except Exception as err:
                raise RuntimeError(f"{module.__name__}.example_launch(**{p}) failed") from err
    finally:
        for fn in (*kernels.values(), *others):
            del fn.run
    return launches


def compile_jobs(launches: list, archs) -> dict:
    """Distinct compiles: key -> (job for a worker, the launch points that need it)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    jobs = {}
    for arch in archs:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        for fn, args, kwargs, point in launches:
            kw = dict(kwargs)  # the options JITFunction.run adds before it binds
            kw["debug"] = kw.get("debug", fn.debug) or knobs.runtime.debug
            kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
            kw["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            bound, spec, opts = binder(*args, **kw)
            options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
            job = (fn.module, fn.__name__, arch, signature, constexprs, attrs, options.__dict__)
            key = repr(job)
            jobs.setdefault(key, (job, []))[1].append(point)
    return jobs


# ----------------------------------------------------------------------------- workers


def parse_ptxas_log(log: str) -> dict:
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not (regs and spill):
        raise RuntimeError(f"no register / spill counts in the ptxas log:\n{log[-2000:]}")
    return {"regs": int(regs[1]), "spill_st": int(spill[1]), "spill_ld": int(spill[2])}


def _worker(conn) -> None:
    """Compile jobs until None arrives; reply with the resources or the error."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs.nvidia.dump_ptxas_log = True  # printed on stdout after each ptxas run
    while (job := conn.recv()) is not None:
        module, name, arch, signature, constexprs, attrs, options = job
        fn = jit_functions(importlib.import_module(module))[name]
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                k = triton.compile(
                    ASTSource(fn, signature, constexprs, attrs),
                    target=GPUTarget("cuda", arch, 32),
                    options=options,
                )
            res = parse_ptxas_log(out.getvalue())
            res |= {"ok": True, "shared": k.metadata.shared, "warps": k.metadata.num_warps}
        except Exception as err:  # a compile error is a result: reported, the next job goes on
            res = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        conn.send(res)


def run_jobs(jobs: list, workers: int, timeout: float) -> list[dict]:
    """Results in job order; a job past ``timeout`` seconds kills its worker (a new one starts)."""
    ctx = mp.get_context("spawn")

    def start():
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child,), daemon=True)
        proc.start()
        child.close()
        return {"proc": proc, "conn": parent, "job": None, "deadline": 0.0}

    results: list = [None] * len(jobs)
    pending = list(range(len(jobs)))[::-1]
    slots = [start() for _ in range(max(1, min(workers, len(jobs))))]
    while pending or any(s["job"] is not None for s in slots):
        for s in slots:
            if s["job"] is None and pending:
                s["job"], s["deadline"] = pending.pop(), time.monotonic() + timeout
                s["conn"].send(jobs[s["job"]])
        busy = [s for s in slots if s["job"] is not None]
        wait = max(0.0, min(s["deadline"] for s in busy) - time.monotonic())
        ready = mp.connection.wait([s["conn"] for s in busy], timeout=wait)
        for n, s in enumerate(slots):
            if s["job"] is None:
                continue
            if s["conn"] in ready:
                try:
                    results[s["job"]] = s["conn"].recv()
                    s["job"] = None
                    continue
                except EOFError:
                    error = f"the compiling process died (exit code {s['proc'].exitcode})"
            elif time.monotonic() >= s["deadline"]:
                error = f"timed out after {timeout:g} s (a hung ptxas?)"
            else:
                continue
            results[s["job"]] = {"ok": False, "error": error}
            s["proc"].kill()
            slots[n] = start()
    for s in slots:
        s["conn"].send(None)
        s["proc"].join(timeout=10)
    return results


# ----------------------------------------------------------------------------- report


def describe(job: tuple) -> str:
    """A launch in a table cell: the first pointer's type, num_warps, the constexprs (switches
    that are on by name), and whether some pointer is not 16-byte aligned."""
    _, _, _, signature, constexprs, attrs, options = job
    names = list(signature)
    ptr = next((t for t in signature.values() if t.startswith("*")), "")
    parts = [ptr.lstrip("*"), f"warps={options['num_warps']}"]
    for (i,), v in sorted(constexprs.items()):
        if v is True:
            parts.append(names[i])
        elif v is not False and names[i].isupper():
            parts.append(f"{names[i]}={v}")
    unaligned = any(signature[names[i]].startswith("*") and not a for (i,), a in attrs.items())
    return " ".join(parts + (["unaligned"] if unaligned else []))


def problems(job: tuple, res: dict) -> list[str]:
    arch = job[2]
    if not res["ok"]:
        return [res["error"]]
    out = []
    if res["spill_st"] > SPILL_BUDGET:
        out.append(f"{res['spill_st']} bytes of spill stores > the {SPILL_BUDGET}-byte budget")
    if res["shared"] > SHARED_LIMIT[arch]:
        out.append(f"{res['shared']} bytes of shared memory > sm_{arch}'s {SHARED_LIMIT[arch]}")
    if res["regs"] * res["warps"] * 32 > REGISTER_FILE:
        out.append(f"{res['regs']} registers x {res['warps'] * 32} threads > {REGISTER_FILE}")
    return out


def table(jobs: list, results: list) -> list[str]:
    """Markdown rows: per kernel and architecture the worst resources over its compiles."""
    rows = [
        "| kernel | arch | compiles | registers | spill st/ld (B) | shared (B) | warps | worst |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict = {}
    for job, res in zip(jobs, results, strict=True):
        groups.setdefault((job[1], job[2]), []).append((job, res))
    for (name, arch), items in sorted(groups.items()):
        done = [(j, r) for j, r in items if r["ok"]]
        failed = len(items) - len(done)
        if not done:
            rows.append(f"| {name} | sm_{arch} | {len(items)} | - | - | - | - | all failed |")
            continue
        weight = lambda jr: (jr[1]["spill_st"], jr[1]["regs"], jr[1]["shared"])
        worst_job, _ = max(done, key=weight)
        warps = "/".join(str(w) for w in sorted({r["warps"] for _, r in done}))
        rows.append(
            f"| {name} | sm_{arch} | {len(items)}{f' ({failed} failed)' if failed else ''} "
            f"| {max(r['regs'] for _, r in done)} "
            f"| {max(r['spill_st'] for _, r in done)}/{max(r['spill_ld'] for _, r in done)} "
            f"| {max(r['shared'] for _, r in done)} | {warps} | {describe(worst_job)} |"
        )
    return rows


def kernel_modules(names: list[str]) -> list:
    if names:
        return [importlib.import_module(n) for n in names]
    package = importlib.import_module("papo_fast.kernels")
    return [
        importlib.import_module(f"{package.__name__}.{m.name}")
        for m in pkgutil.iter_modules(package.__path__)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default=",".join(map(str, ARCHS)), help="e.g. 80,90,100")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser.add_argument("--jobs", type=int, default=cores or 1, help="worker processes")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per compile")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--module", action="append", default=[], help="only these modules")
    args = parser.parse_args(argv)
    archs = [int(a) if a.strip().isdigit() else a for a in args.arch.split(",")]
    unknown = [a for a in archs if a not in SHARED_LIMIT]
    if unknown:
        parser.error(f"--arch {args.arch!r}: {unknown} unknown, the limits are known for "
                     f"{sorted(SHARED_LIMIT)} (sm_80, sm_90, sm_100)")  # fmt: skip
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    cache = tempfile.mkdtemp(prefix="compile_check_")
    os.environ["TRITON_CACHE_DIR"] = cache  # fresh, so that ptxas runs (workers inherit it)
    t0 = time.monotonic()
    try:
        return _check(args, archs, t0)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _check(args, archs, t0) -> int:
    import triton

    failures, launches, inlined = [], [], []
    modules = kernel_modules(args.module)
    every = [fn for m in kernel_modules([]) for fn in jit_functions(m).values()]
    for module in modules:
        kernels = jit_functions(module)
        if not kernels:
            continue
        if not (hasattr(module, "LAUNCH_SPACE") and hasattr(module, "example_launch")):
            failures.append(
                f"{module.__name__}: kernels {sorted(kernels)} but no LAUNCH_SPACE and "
                "example_launch to compile them at"
            )
            continue
        others = [fn for fn in every if fn not in kernels.values()]
        found = record_launches(module, kernels, others)
        launched = {fn for fn, *_ in found}
        reached = launched.union(*(called_jit_functions(fn) for fn in launched))
        for name, fn in sorted(kernels.items()):
            if fn not in reached:
                failures.append(f"{name}: no launch in {module.__name__}.LAUNCH_SPACE compiles it")
        for fn in sorted(launched, key=lambda f: f.__name__):
            for param in fn.params:
                values = [kw.get(param.name) for f, _, kw, _ in found if f is fn]
                if all(isinstance(v, bool) for v in values) and len(set(values)) == 1:
                    failures.append(
                        f"{fn.__name__}: switch {param.name} is always {values[0]} over "
                        f"{module.__name__}.LAUNCH_SPACE (an input the space misses?)"
                    )
        launches += found
        for fn in sorted(launched, key=lambda f: f.__name__):
            callees = sorted(f.__name__ for f in called_jit_functions(fn))
            inlined += [f"- {', '.join(callees)}: called by {fn.__name__}"] if callees else []
    jobs = compile_jobs(launches, archs)
    keys = list(jobs)
    print(f"{len(launches)} launches -> {len(keys)} compiles for sm_{archs}, {args.jobs} workers")
    results = run_jobs([jobs[k][0] for k in keys], args.jobs, args.timeout)
    for key, res in zip(keys, results, strict=True):
        job, points = jobs[key]
        for problem in problems(job, res):
            failures.append(f"{job[1]} sm_{job[2]} [{describe(job)}] at {points[0]}:\n  {problem}")
    rows = table([jobs[k][0] for k in keys], results)
    spilled = collections.Counter(
        f"- {job[1]} sm_{job[2]}: {res['spill_st']}/{res['spill_ld']} B, {res['regs']} registers "
        f"[{describe(job)}]"
        for job, res in ((jobs[k][0], r) for k, r in zip(keys, results, strict=True))
        if res["ok"] and res["spill_st"] + res["spill_ld"] > 0
    )  # compiles that differ only in what describe() leaves out count once, with their number
    spills = [f"{line} x{n}" if n > 1 else line for line, n in sorted(spilled.items())]
    rows += ["", "Compiled inside the kernels that call them:", *(inlined or ["- none"])]
    rows += ["", f"Spills (stores/loads per thread, budget {SPILL_BUDGET} B of stores):"]
    rows += spills or ["- none"]
    elapsed = time.monotonic() - t0
    print("\n".join(rows))
    if args.markdown:
        head = (
            f"{datetime.date.today()}, triton {triton.__version__}: {len(keys)} compiles "
            f"({len(launches)} recorded launches) for sm_{', sm_'.join(map(str, archs))} in "
            f"{elapsed:.0f} s on {args.jobs} worker(s)."
        )
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(head + "\n\n" + "\n".join(rows) + "\n")
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    print(f"{len(failures)} failure(s), {elapsed:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
