#!/usr/bin/env bash
# One device call: install the carried wheel, run the GPU tests that cover the expert-table decode
# path and the kernels, then the trained checkpoint's decode benchmark (SIDA_ARGS) and the host-free
# decode benchmark (BENCH_ARGS). Logs and JSON under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-index --force-reinstall dist/*.whl 2>&1 | tail -2
cd /tmp  # import the installed wheel, not the source tree
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
TESTS=${TESTS-"tests/test_decode_table.py tests/test_kernels_cuda.py tests/test_offload_gpu.py"}
if [ -n "$TESTS" ]; then
  (cd "$OLDPWD" && timeout "${TEST_TIMEOUT:-240}" python3 -m pytest $TESTS -m gpu -q -p no:cacheprovider \
     --import-mode=append 2>&1 | tail -40 | tee "$OUT/gpu_tests.log")
fi
if [ -n "${SIDA_ARGS:-}" ]; then
  (cd "$OLDPWD" && timeout "${SIDA_TIMEOUT:-200}" python3 benches/sida_decode.py $SIDA_ARGS --out "$OUT/sida.json" 2>&1 \
     | grep -v Warning | tee "$OUT/sida.log" | tail -30)
fi
if [ -n "${BENCH_ARGS:-}" ]; then
  (cd "$OLDPWD" && timeout "${BENCH_TIMEOUT:-400}" python3 benches/host_free_decode.py $BENCH_ARGS --out "$OUT/bench.json" 2>&1 \
     | grep -v Warning | tee "$OUT/bench.log" | tail -40)
fi
