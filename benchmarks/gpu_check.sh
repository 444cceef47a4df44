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
# PYTHON names the interpreter (default python3: on the GPU machine, the one that holds torch).
# Exit status 0 when every stage ran, 1 when one failed or timed out, 2 on bad arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
