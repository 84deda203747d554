#!/usr/bin/env bash
# One call on the lent GPU machine: GPU tests, then benchmarks, each step under its own time limit, logs and
# result files under $OUT (and bench/results/). Wheels carried in .whl/ (comfy-kitchen, the per-layer
# benchmark's community reference) are installed first.
#
#   bash bench/gpu_session.sh "tests" "python bench/bench_quantize_rows.py --sweep-warps" ...
#
# "tests" runs the W8A8 kernel tests natively (GPU_TESTS=... names other files or pytest arguments); any other
# argument is a command run as is, with --out $OUT appended. Each step gets STEP_TIMEOUT_S seconds (default
# 300). The exit status is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dit_quant_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader | tee "$OUT/gpu.txt"
DEFAULT_GPU_TESTS="tests/test_kernels_w8a8.py tests/test_w8a8_autotune.py tests/test_triton_launch.py tests/test_dit_fusions.py"
failed=0
for step in "$@"; do
  if [ "$step" = tests ]; then
    command="python3 -m pytest -q -p no:cacheprovider ${GPU_TESTS:-$DEFAULT_GPU_TESTS}"
  else
    command="$step --out $OUT"
  fi
  echo "=== $command" | tee -a "$OUT/session.log"
  timeout "${STEP_TIMEOUT_S:-300}" bash -c "$command" 2>&1 | tee -a "$OUT/session.log" | tail -n 40
  status=${PIPESTATUS[0]}
  echo "=== exit $status" | tee -a "$OUT/session.log"
  [ "$status" -eq 0 ] || failed=$((failed + 1))
done
exit "$failed"
