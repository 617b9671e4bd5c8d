"""The options of an offloaded model are resolved once (``ServingConfig.resolve``), before the
model is touched, and the engine keeps what it was built with."""

import pytest
import torch

from _moe_models import tiny_model
import sida_moe
from sida_moe.prefetchers import NextLayerGate, NoPrefetch
from sida_moe.serving_config import ServingConfig


def test_resolve_checks_every_option_and_resolves_the_prefetcher():
    c = ServingConfig.resolve("25%", "lfu", "none", "host", 3, True)
    assert (c.gpu_budget, c.policy, c.backend, c.copy_workers, c.progress) == ("25%", "lfu", "host", 3, True)
    assert isinstance(c.prefetcher, NoPrefetch)
    assert isinstance(ServingConfig.resolve().prefetcher, NextLayerGate)
    with pytest.raises(ValueError, match="cannot parse gpu_budget '12 parsecs'"):
        ServingConfig.resolve(gpu_budget="12 parsecs")
    with pytest.raises(sida_moe.InvalidArgumentError, match="policy"):
        ServingConfig.resolve(policy="mru")
    with pytest.raises(TypeError, match="copy_workers must be an int"):
        ServingConfig.resolve(copy_workers=2.0)
    with pytest.raises(ValueError, match="backend must be 'auto', 'cuda' or 'host', got 'tpu'"):
        ServingConfig.resolve(backend="tpu")
    with pytest.raises(TypeError, match="progress must be a bool"):
        ServingConfig.resolve(progress="yes")
    with pytest.raises(ValueError, match="unknown prefetch"):
        ServingConfig.resolve(prefetch="psychic")


def test_a_budget_that_cannot_be_read_is_refused_before_the_model_changes():
    model = tiny_model("qwen3_moe")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot parse gpu_budget"):
        sida_moe.offload(model, gpu_budget="12 parsecs")
    assert not hasattr(model, "sida_engine")
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[n], t) for n, t in before.items())


def test_the_engine_keeps_the_config_it_was_built_with():
    model = sida_moe.offload(tiny_model("qwen3_moe"), gpu_budget="50%", policy="fifo", prefetch="none", copy_workers=1)
    try:
        config = model.sida_engine.config
        assert (config.gpu_budget, config.policy, config.copy_workers) == ("50%", "fifo", 1)
        assert config.prefetcher is model.sida_engine.prefetcher
    finally:
        model.sida_engine.close()
