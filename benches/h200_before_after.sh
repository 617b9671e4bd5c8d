#!/usr/bin/env bash
# One device call: the same benchmark command with the wheel of the change before (carried in
# .carry_before/, installed to a side directory) and with this change's wheel (dist/), one process
# each, in one lease. Env: BENCH (script under benches/, default host_free_decode.py), ARGS (its
# arguments, without --out), TIMEOUT (seconds per process), TESTS (GPU tests run first, optional),
# WHICH (default "before after": one of them alone when both do not fit one call).
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-index --target /tmp/sida_before .carry_before/*.whl 2>&1 | tail -2
python3 -m pip install -q --no-deps --no-index --force-reinstall dist/*.whl 2>&1 | tail -2
if [ -n "${TESTS:-}" ]; then
  timeout "${TEST_TIMEOUT:-200}" python3 -m pytest $TESTS -m gpu -q -p no:cacheprovider --import-mode=append --tb=short \
    2>&1 | grep -v Warning | tail -30 | tee "$OUT/gpu_tests.log"
fi
BENCH=${BENCH:-host_free_decode.py}
for which in ${WHICH:-before after}; do
  if [ "$which" = before ]; then pp=/tmp/sida_before; else pp=; fi
  PYTHONPATH=$pp python3 -c "import sida_moe; print('$which:', sida_moe.__file__)"
  PYTHONPATH=$pp timeout "${TIMEOUT:-280}" python3 "benches/$BENCH" $ARGS --out "$OUT/$which.json" 2>&1 \
    | grep -v Warning | tee "$OUT/$which.log" | tail -12
done
