#!/usr/bin/env bash
# End-to-end benchmark on the H100 (issue 6): the Qwen3-30B-A3B-shaped preset (48 layers, 128
# experts top-8, bf16, random weights) through `sida-moe bench`, after a smoke run on the tiny
# preset. Run from the repository root with a wheel built by `maturin build --release -o dist`:
#   bash benches/e2e_h100.sh "$OUT"
# Writes bench.json / bench.md / PNG plots under $1/e2e and the logs under $1. Environment: WHEEL_DIR,
# BUDGETS, POLICIES, PREDICTORS, BASELINES, NEW_TOKENS.
set -euo pipefail
out=${1:?output directory}
mkdir -p "$out"
python3 -m pip install -q --no-deps --no-index --force-reinstall ${WHEEL_DIR:-dist}/*.whl
cd /tmp
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
sida-moe bench --model qwen3-moe-tiny --device cuda --budgets 25% --policies lru,belady --predictors none,next_layer_gate \
  --baselines resident,ondemand_lru --new-tokens 8 --prompt-tokens 8 --no-timeline --out "$out/smoke" 2>&1 | tail -12
sida-moe bench --model qwen3-30b-a3b --device cuda --budgets "${BUDGETS:-10%,25%,50%}" \
  --policies "${POLICIES:-lru,lfu,fifo,predictive,belady}" --predictors "${PREDICTORS:-none,next_layer_gate}" \
  --baselines "${BASELINES:-resident,accelerate_cpu,ondemand_lru,sida_sync}" \
  --new-tokens "${NEW_TOKENS:-24}" --prompt-tokens 32 --accelerate-new-tokens 3 --out "$out/e2e" 2>&1 | tee "$out/e2e.log" | grep -v "bench:" 
