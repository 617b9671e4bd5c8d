set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-index --force-reinstall dist/*.whl 2>&1 | tail -2
timeout 100 python3 benches/sida_decode.py --dtype float32 --reference --batches 1,8 --rounds 2 --new-tokens 64 --out $OUT/sida_fp32.json > $OUT/sida_fp32.log 2>&1; echo "rc $?"
grep -v "Loading\|loading\|Warning" $OUT/sida_fp32.log | tail -14
timeout 300 python3 benches/host_free_decode.py --preset qwen3-30b-a3b --routings replay:benches/data/qwen3moe_128x8_stdlib_routing.npz --batches 8 --budgets 25% --new-tokens 16 --rounds 1 --sim-tokens 24 --out $OUT/replay_bs8.json 2>&1 | grep -v Warning | tee $OUT/replay_bs8.log | tail -8
