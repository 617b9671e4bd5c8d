"""On a CUDA device: offloaded tiny models (CUDA slot cache, pinned pool, CUDA expert kernels)
give the original's greedy tokens; GPU memory for experts stays within the budget."""

import copy

import pytest
import torch

from _moe_models import LOGIT_RTOL, eager_experts, forward_logits, greedy, prompt_batch, tiny_model
import sida_moe

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "switch_transformers", "deepseek_v3"])
@pytest.mark.parametrize("budget", [0.3, 1.0])
def test_cuda_offload_matches_original(family, budget):
    original = eager_experts(tiny_model(family, torch.bfloat16)).cuda()
    offloaded = sida_moe.offload(copy.deepcopy(original), gpu_budget=budget, prefetch="next_layer_gate")
    engine = offloaded.sida_engine
    assert engine.cache.backend_kind == "cuda"
    ids, mask = (t.cuda() for t in prompt_batch())
    with torch.inference_mode():
        want, got = forward_logits(original, ids, mask).float(), forward_logits(offloaded, ids, mask).float()
        assert torch.equal(greedy(original, ids, mask), greedy(offloaded, ids, mask))
    assert (want - got).abs().max() <= LOGIT_RTOL[torch.bfloat16] * want.abs().max()
    stats = engine.stats()
    assert stats["slot_bytes"] <= budget * stats["all_experts_bytes"] + engine.expert_nbytes
    assert engine.slot_memory.is_cuda
    engine.close()
