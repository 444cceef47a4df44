#!/usr/bin/env bash
# One call on a CUDA machine: the CUDA tests, the copy-bandwidth and matmul references, then the
# kernel benchmark suites, everything written under $OUT (default: ./gpu_results).
# Uses the machine's own torch and triton (no downloads); about 5 minutes on an H200.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$out/install.log" 2>&1 ||
    { echo "install failed"; tail -5 "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 - <<'PY' | tee -a "$out/gpu.txt"
import torch, triton
print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
y = torch.empty_like(x)
for _ in range(3):
    y.copy_(x)
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
s.record()
for _ in range(10):
    y.copy_(x)
e.record()
torch.cuda.synchronize()
print(f"copy: {2 * x.numel() * 10 / (s.elapsed_time(e) / 1e3) / 1e12:.2f} TB/s (read + write)")
a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
for _ in range(3):
    a @ a
s.record()
for _ in range(10):
    a @ a
e.record()
torch.cuda.synchronize()
print(f"bf16 matmul 8192^3: {2 * 8192**3 * 10 / (s.elapsed_time(e) / 1e3) / 1e12:.0f} TFLOP/s")
PY
timeout 120 python3 -m pytest tests/ -m cuda -q -p no:cacheprovider 2>&1 | tee "$out/cuda_tests.log" | tail -15
timeout 360 python3 -m pytest benchmarks/bench_advantages.py benchmarks/bench_policy_loss.py \
    benchmarks/bench_fused_linear.py --benchmark-only -q -p no:cacheprovider \
    --benchmark-columns=min,median,mean,rounds --benchmark-json="$out/bench.json" 2>&1 |
    tee "$out/bench.log" | tail -40
