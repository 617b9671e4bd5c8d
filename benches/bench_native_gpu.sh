#!/usr/bin/env bash
# One device call for the native runtime: install the wheel from dist/, run the native tests
# (GPU-marked ones included), then the native microbenchmarks; logs and JSON go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/native_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-deps --no-index --force-reinstall dist/*.whl 2>&1 | tail -2
python3 -c "import sida_moe as s; print(s.__file__, s.Backend('auto'), s.Backend.cuda_available())"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 200 python3 -m pytest tests/test_native_*.py -q -p no:cacheprovider -x ${TEST_ARGS:-} 2>&1 | tail -40 | tee "$OUT/tests.log"
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout 300 python3 -m pytest benches/bench_native_*.py -q -p no:cacheprovider ${BENCH_ARGS:-} \
    --benchmark-json="$OUT/h100_native.json" --benchmark-columns=median,rounds 2>&1 | tail -70 | tee "$OUT/bench.log"
fi
