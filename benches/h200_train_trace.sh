#!/usr/bin/env bash
# One device call: install the carried wheel, train the 128-experts top-8 reference model and record
# its held-out routing trace for routing replay (benches/record_routing_trace.py), into $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-index --force-reinstall dist/*.whl 2>&1 | tail -2
timeout "${TRAIN_TIMEOUT:-260}" python3 benches/train_reference_model.py --out /tmp/ref-moe-128x8 --experts 128 --top-k 8 \
    --expert-size 192 --seconds "${TRAIN_SECONDS:-150}" 2>&1 | tail -8 | tee "$OUT/train.log"
timeout 120 python3 benches/record_routing_trace.py --model /tmp/ref-moe-128x8 \
    --out "$OUT/qwen3moe_128x8_stdlib_routing.npz" 2>&1 | tail -5 | tee "$OUT/trace.log"
cp /tmp/ref-moe-128x8/split.json "$OUT/" 2>/dev/null
