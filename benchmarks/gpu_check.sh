#!/usr/bin/env bash
# One call on a machine with one GPU, under 8 minutes: install (no downloads: carried wheels in
# .whl/ for what the machine lacks, then this package), the CUDA tests, the copy and matmul
# references, the kernel suites against their baselines, peak memory against liger-kernel.
# Writes results.json and results.md (and the logs) to --out (default $OUT, else gpu_results).
#
#   benchmarks/gpu_check.sh [--quick] [--dry-run] [--out DIR] [--budget SECONDS] [--wheels DIR]
#                           [--skip STAGE,...]
#
# --dry-run rehearses the whole pipeline on the CPU on tiny sizes (same stages, same outputs).
# Wheels for what the GPU machine's image lacks (liger-kernel, pure Python) go in .whl/:
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl liger-kernel==0.8.5
# PYTHON names the interpreter (default python3: on the GPU machine, the one that holds torch).
# Exit status 0 when no stage failed or timed out (skipped ones included), 1 otherwise, 2 on bad
# arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
