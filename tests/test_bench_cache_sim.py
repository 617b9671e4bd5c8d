"""The host-free decode benchmark's cache-simulation pass (``benches/host_free_decode.py``): the
visit sequence of a replayed-routing run, run through each policy alone
(``sida_moe.bench.policy_replay``, tested in test_policy_replay.py), counts what the real cache
counted, and Belady's (the predictive policy fed that sequence) is the best."""

from __future__ import annotations

import copy
import os
import sys

import numpy as np
import pytest
import torch

import sida_moe
from _moe_models import eager_experts, tiny_model

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benches"))
import host_free_decode as bench  # noqa: E402
from sida_moe.bench import replay as rr  # noqa: E402


@pytest.mark.parametrize("batch,prompt", [(2, 4), (1, 20)])  # prefill through the table / through acquire
def test_the_pass_reports_the_real_cache_and_the_replayed_policies(tmp_path, batch, prompt):
    g = np.random.default_rng(0)
    ids = np.stack([[g.permutation(8)[:3] for _ in range(2)] for _ in range(40)]).astype(np.uint8)
    rr.save_routing_trace(str(tmp_path / "t.npz"), ids, {"num_experts": 8, "seq_len": 40, "source": {}})
    model = sida_moe.offload(copy.deepcopy(eager_experts(tiny_model("qwen3_moe", num_hidden_layers=4))),
                             gpu_budget="40%", policy="lru", prefetch="none")
    engine = sida_moe.engine_of(model)
    rr.ReplayRouting(model, rr.load_routing_trace(str(tmp_path / "t.npz")))
    out = bench.cache_sim(engine, model, torch.randint(3, 90, (batch, prompt)), 12, "lru")
    layers = len(engine.layers)
    assert out["visits"] == layers * 12 and out["tokens_per_row"] == prompt + 11
    assert out["table_visits"] == layers * (12 if batch * prompt * 3 <= 48 else 11)
    assert out["lookups"] == out["real_lookups"] > 0
    rates = out["hit_rate"]
    assert all(rates["belady"] >= rates[p] for p in ("lru", "fifo", "lfu"))
    assert abs(rates["real"] - rates["lru"]) < 0.1  # the same policy code; loads in flight aside
    assert out["real_over_belady"] == pytest.approx(rates["real"] / rates["belady"])

