#!/usr/bin/env bash
# One device call: install the carried wheel, run the GPU tests named in TESTS, train the small
# reference checkpoint (Qwen3-MoE, 8 layers, hidden 512, 32 experts of 1.5 MiB top-4, with its SiDA
# predictor: benches/train_default_model.py at the reference model's sizes) and time decode with and
# without the predictor at 25% (benches/sida_decode.py), everything into $OUT.
# Env: TESTS, TRAIN_SECONDS (model, default 90), PSEC (predictor, default 50), ARGS (sida_decode's, without --model/--out),
# ARGS2 (a second sida_decode run's, e.g. another budget), SHIFTED=SECONDS (then also train a
# next-token predictor for that long, benches/predictor_shifted_target.py, and run sida_decode with
# ARGS on a copy of the checkpoint serving it: $OUT/sida_decode_shifted.*).
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-index --force-reinstall dist/*.whl 2>&1 | tail -2
if [ -n "${TESTS:-}" ]; then
  timeout "${TEST_TIMEOUT:-150}" python3 -m pytest $TESTS -m gpu -q -p no:cacheprovider --import-mode=append --tb=short \
    2>&1 | grep -v Warning | tail -30 | tee "$OUT/gpu_tests.log"
fi
ckpt=/tmp/ref-moe-8x32
[ -f "$ckpt/training.json" ] || timeout "${TRAIN_TIMEOUT:-300}" python3 benches/train_default_model.py --out "$ckpt" --layers 8 --hidden 512 --experts 32 \
  --top-k 4 --expert-size 512 --vocab-size 8192 --seq-len 512 --batch-size 32 --lr 2e-3 --moe-inputs-every 64 \
  --seconds "${TRAIN_SECONDS:-90}" --predictor-seconds "${PSEC:-50}" --lookahead-seconds 2 --eval-every 100000 \
  2>&1 | grep -v -i warn | tee "$OUT/train.log" | tail -6
cp "$ckpt/training.json" "$OUT/" 2>/dev/null
timeout "${DECODE_TIMEOUT:-280}" python3 benches/sida_decode.py --model "$ckpt" ${ARGS:---budget 25% --batches 1,8 --compile} \
  --out "$OUT/sida_decode.json" 2>&1 | grep -v -i warn | tee "$OUT/sida_decode.log" | tail -16
if [ -n "${ARGS2:-}" ]; then
  timeout "${DECODE_TIMEOUT:-280}" python3 benches/sida_decode.py --model "$ckpt" $ARGS2 \
    --out "$OUT/sida_decode2.json" 2>&1 | grep -v -i warn | tee "$OUT/sida_decode2.log" | tail -16
fi
if [ -n "${SHIFTED:-}" ]; then
  timeout "${SHIFTED_TIMEOUT:-200}" python3 benches/predictor_shifted_target.py --model "$ckpt" --device cuda \
    --seconds "$SHIFTED" --save-shifted "$ckpt-shifted" --out "$OUT/predictor_shifted_target.json" \
    2>&1 | grep -v -i warn | tail -4 | tee "$OUT/predictor_shifted_target.log"
  timeout "${DECODE_TIMEOUT:-280}" python3 benches/sida_decode.py --model "$ckpt-shifted" ${ARGS:---budget 25% --batches 1,8 --compile} \
    --out "$OUT/sida_decode_shifted.json" 2>&1 | grep -v -i warn | tee "$OUT/sida_decode_shifted.log" | tail -16
fi
