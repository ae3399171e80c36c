#!/usr/bin/env bash
# GPU checks for issues 5 and 14 (the fused kernels), prepared for a lent H100/H200 device machine.
#
#   bench/gpu.sh            # from anywhere; results in $OUT (if set) else ./bench-gpu-out
#
# The device machine has no network: it uses the python that is there (PYTHON, else
# python3) with torch (a CUDA build, which ships Triton), numba, grpcio and pytest, and
# imports lossd from this checkout (PYTHONPATH), without pip. What its image lacks travels
# as wheels (the device tool's README): pydantic, pydantic-settings, grpcio-health-checking,
# grpcio-reflection, prometheus-client and, for the Liger comparison, liger-kernel; when a
# .whl folder is there this script installs it into /tmp/site first. Each step has its own
# timeout (seconds, overridable) so the whole script stays under ~9 minutes:
#   1. the CUDA tests (LOSSD_TEST_DEVICE=cuda): tests/test_cuda.py, the compiled Triton kernel
#      (tests/test_fused_triton.py, CUDA tests included), every math test per kernel
#      (tests/test_math.py, tests/test_fused_statistics.py);
#   2. bench/gpu_math.py: the OLS and LS math, eager and fused (Triton), torch's LS CE and Liger's CE
#      at 256x1000, 1024x1000 float32 and 1024x32000 bfloat16 against the HBM floor (read the logits
#      + write the gradient at the measured copy bandwidth); issue 14's target: fused OLS <= 2x the
#      floor at 1024x32000 bfloat16;
#   3. python -m bench --device cuda: the harness with the server and the local paths on the GPU
#      (absolute times are meaningful on the GPU only).
# Exit status: 0 when every step passed, else the number of failed steps (2 = no CUDA device).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-$ROOT/bench-gpu-out}
mkdir -p "$OUT_DIR"
if [ -d "$ROOT/.whl" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$ROOT"/.whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT/client:$ROOT/server:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export LOSSD_TEST_DEVICE=cuda
SUMMARY=$OUT_DIR/summary.txt
: >"$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }

note "bench/gpu.sh $(date -u '+%Y-%m-%d %H:%M UTC') commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi >"$OUT_DIR/nvidia-smi.txt" 2>&1 || true
if ! "$PY" -c 'import torch, sys; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name()) if torch.cuda.is_available() else sys.exit(1)' \
    >>"$SUMMARY" 2>&1; then
    note "no CUDA device (or no CUDA torch) for $PY: nothing to run"
    exit 2
fi
for module in grpc pydantic pydantic_settings grpc_health pytest numba triton; do
    "$PY" -c "import $module" 2>/dev/null || note "missing python package: $module (steps that need it will fail)"
done

failed=0
step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.txt" 2>&1
    local rc=$?
    note "$name: rc=$rc in $((SECONDS - start)) s (limit $limit s) -> $OUT_DIR/$name.txt"
    tail -n 30 "$OUT_DIR/$name.txt"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

step tests "${GPU_TESTS_TIMEOUT:-240}" "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    tests/test_fused_triton.py tests/test_fused_statistics.py tests/test_math.py
step gpu_math "${GPU_MATH_TIMEOUT:-120}" "$PY" bench/gpu_math.py
# 1024x32000: the OLS matrices are 12 GB a session (x4 remote OLS paths, plus the reference
# baseline's 8 GB here), so the server gets a 64 GiB budget; C=32000 is a GPU-host shape for OLS,
# so the per-byte label-smoothing section (a CPU-host check) is skipped.
step bench_cuda "${GPU_BENCH_TIMEOUT:-180}" "$PY" -m bench --device cuda --threads 4 --server-threads 4 \
    --shapes 256x1000,1024x1000,1024x32000 --repeats 20 --warmup 5 \
    --per-byte-shapes none --server-budget $((64 << 30)) --json "$OUT_DIR/bench_cuda.json"
note "failed steps: $failed"
exit "$failed"
