set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-index --force-reinstall dist/*.whl 2>&1 | tail -2
timeout 150 python3 -m pytest tests/test_predictor_prefetcher.py tests/test_decode_table.py tests/test_routing_replay.py -m gpu -q -p no:cacheprovider --import-mode=append --tb=short 2>&1 | grep -v Warning | tail -30 | tee $OUT/gpu_tests.log
timeout 100 python3 benches/sida_decode.py --dtype float32 --reference --batches 1,8 --rounds 2 --new-tokens 64 --out $OUT/sida_fp32.json 2>&1 | grep "\]" | tee $OUT/sida_fp32.log | tail -8
timeout 100 python3 benches/sida_decode.py --reference --batches 1,8 --rounds 5 --new-tokens 128 --out $OUT/sida_bf16.json 2>&1 | grep "\]" | tee $OUT/sida_bf16.log | tail -8
timeout 330 python3 benches/host_free_decode.py --preset qwen3-30b-a3b --routings replay:benches/data/qwen3moe_128x8_stdlib_routing.npz --batches 1 --budgets 25%,100% --new-tokens 48 --rounds 2 --out $OUT/replay_bs1.json 2>&1 | grep -v Warning | tee $OUT/replay_bs1.log | tail -14
