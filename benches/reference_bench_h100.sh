#!/usr/bin/env bash
# Issues 5 and 6 on the trained reference model, in one device call (about 9 minutes on an H100):
#   1. benches/predictor_pipeline.py: train the reference MoE LM on the Python standard library
#      (Qwen3-MoE, 8 layers, 32 experts top-4), trace its routing, train the hash function, report
#      held-out recall, hash-routing loss, predictor cost and a cache simulation;
#   2. benches/predictor_overhead.py (when OVERHEAD_ROUNDS > 0): tokens/s with and without the
#      predictor, alternated for several rounds in one process, split into the predictor's own cost
#      (predictions computed, nothing handed to the cache) and the full prefetcher;
#   3. `sida-moe bench` on that model with the trained predictor, prompts cut from the held-out
#      files: every policy (oracle Belady as the ceiling) x predictor at 10/25/50% expert budgets,
#      plus the baselines.
# Run from the repository root with the wheel installed:  bash benches/reference_bench_h100.sh OUTDIR
# Environment: VARIANT (predictor variant of predictor_pipeline.py), PSEC (its training seconds),
# TRAIN_SECONDS (reference model), EXTRA_TOKENS (tokens of extra corpus traced for a VARIANT named
# NAME+ext: predictor_pipeline.py --extra-tokens), LOOK_SEC (lookahead heads' training seconds; 0: none),
# MOE_EVERY (router inputs of every N-th training sequence traced for the heads), CROSSFIT (seconds of the
# heads' cross-fit network: predictor_pipeline.py --lookahead-crossfit; LOOK_COMPARE=1 adds --lookahead-compare),
# FOLDS (cross-fit folds, default 2), LOOK_EXTRA (--lookahead-extra settings compared first), BENCH (0: stop after the pipeline),
# OVERHEAD_ROUNDS (default 0), OVERHEAD_CONFIGS (its --configs), OVERHEAD_POLICIES (space-separated, default lru;
# BENCH=0 with OVERHEAD_ROUNDS > 0 stops after it), BASELINES, NEW_TOKENS, BUDGETS, POLICIES, PREDICTORS, DEADLINE (seconds after
# which the bench is stopped; bench.json keeps the rows done).
set -uo pipefail
out=${1:?output directory}
work=/tmp/sida-predictor-work
variant=${VARIANT:-topk_kd0.5_h512_mlp}
mkdir -p "$out/pipe" "$out/bench"
export PYTHONUNBUFFERED=1
log="$out/log.txt"
python3 benches/predictor_pipeline.py --out "$out/pipe" --work "$work" --train-seconds "${TRAIN_SECONDS:-110}" \
  --variants "$variant" --predictor-seconds "${PSEC:-190}" --predictor-steps 20000 \
  --extra-tokens "${EXTRA_TOKENS:-8000000}" --lookahead-seconds "${LOOK_SEC:-45}" \
  --moe-inputs-every "${MOE_EVERY:-6}" --lookahead-crossfit "${CROSSFIT:-0}" --lookahead-folds "${FOLDS:-2}" \
  --lookahead-extra "${LOOK_EXTRA:-}" \
  $( [ "${LOOK_COMPARE:-0}" = 1 ] && echo --lookahead-compare ) \
  $( [ "${LOOK_SEC:-45}" = 0 ] && echo --lookahead-hidden 0 ) --held-out-text "$work/heldout.txt" 2>&1 | grep -v -i "warn" >> "$log"
mkdir -p "$work/predictor"
for f in predictor.json predictor.safetensors; do mv "$out/pipe/$variant.$f" "$work/predictor/$f"; done
rm -f "$out/pipe/heldout_routing.safetensors"
if [ "${BENCH:-1}" = 0 ] && [ "${OVERHEAD_ROUNDS:-0}" = 0 ]; then tail -30 "$log"; exit 0; fi
if [ "${OVERHEAD_ROUNDS:-0}" -gt 0 ]; then
  for policy in ${OVERHEAD_POLICIES:-lru}; do
    suffix=$( [ "$policy" = lru ] && echo "" || echo "_$policy" )
    python3 benches/predictor_overhead.py --model "$work/ref-moe" --predictor-path "$work/predictor" \
      --prompt-file "$work/heldout.txt" --rounds "$OVERHEAD_ROUNDS" --out "$out/predictor_overhead$suffix.json" \
      --policy "$policy" --configs "${OVERHEAD_CONFIGS:-none,sida_dry,sida}" 2>&1 \
      | grep -v -i "warn" >> "$log"
  done
fi
if [ "${BENCH:-1}" = 0 ]; then tail -30 "$log"; exit 0; fi
cd /tmp
timeout $(( ${DEADLINE:-585} - SECONDS )) sida-moe bench --model "$work/ref-moe" --predictor-path "$work/predictor" --prompt-file "$work/heldout.txt" \
  --budgets "${BUDGETS:-10%,25%,50%}" --policies "${POLICIES:-lru,lfu,fifo,predictive,belady}" \
  --predictors "${PREDICTORS:-none,next_layer_gate,sida,sida@6}" \
  --baselines "${BASELINES:-resident,accelerate_cpu,ondemand_lru,sida_sync}" --accelerate-new-tokens 8 \
  --prompt-tokens 64 --new-tokens "${NEW_TOKENS:-48}" --out "$out/bench" 2>&1 | grep -v "bench:" >> "$log"
tail -60 "$log"
