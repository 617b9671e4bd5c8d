"""The engine's one hook for benchmarks and tools (``OffloadEngine.observe``): observers see the
prefill acquires and the decode table visits in order, nest, add their figures to the stats, and
change nothing of what the model computes."""

import copy

import pytest
import torch

from _moe_models import eager_experts, tiny_model
import sida_moe
from sida_moe.bench.observers import SyncLoads
from sida_moe.engine_observer import EngineObserver
from sida_moe.visit_trace import VisitRecorder


class _Log(EngineObserver):
    def __init__(self, name, log):
        self.name, self.log = name, log

    def opened(self, engine):
        self.log.append((self.name, "opened"))

    def table_visit(self, engine, moe_layer, ids):
        self.log.append((self.name, "table", moe_layer))

    def acquire(self, engine, moe_layer, experts, call):
        self.log.append((self.name, "acquire", moe_layer))
        slots = call()
        self.log.append((self.name, "acquired", moe_layer))
        return slots

    def stats(self, engine):
        return {f"{self.name}_events": float(len(self.log))}

    def reset(self, engine):
        self.log.append((self.name, "reset"))

    def removed(self, engine):
        self.log.append((self.name, "removed"))


def _pair():
    original = eager_experts(tiny_model("qwen3_moe"))
    return original, sida_moe.offload(copy.deepcopy(original), gpu_budget="50%", prefetch="none", copy_workers=0)


def test_observers_see_acquires_and_table_visits_in_order_and_nest():
    original, offloaded = _pair()
    engine = sida_moe.engine_of(offloaded)
    layers = len(engine.layers)
    long = next(t for t in range(1, 4096) if not engine.uses_table(0, t))
    ids = torch.randint(3, 90, (1, long), generator=torch.Generator().manual_seed(2))
    log = []
    with torch.inference_mode(), engine.observe(_Log("outer", log)), engine.observe(_Log("inner", log)) as inner:
        assert isinstance(inner, _Log)
        assert log == [("outer", "opened"), ("inner", "opened")]
        log.clear()
        prefill = offloaded(input_ids=ids).logits
        acquires = [e for e in log if e[1] == "acquire"]
        # every chunked acquire: the innermost (last added) first, each wrapping the next
        assert acquires and log[:4] == [("inner", "acquire", 0), ("outer", "acquire", 0),
                                        ("outer", "acquired", 0), ("inner", "acquired", 0)]
        log.clear()
        decode = offloaded(input_ids=ids[:, :1]).logits
        assert log == [(n, "table", layer) for layer in range(layers) for n in ("outer", "inner")]
        stats = engine.stats()
        assert stats["outer_events"] == stats["inner_events"] == len(log)
        engine.reset_stats()
        assert log[-2:] == [("outer", "reset"), ("inner", "reset")]
        reopened = len(log)
        engine.reopen_cache(engine.num_slots)
        assert log[reopened:] == [("outer", "opened"), ("inner", "opened")]
    assert log[-2:] == [("inner", "removed"), ("outer", "removed")]
    assert "outer_events" not in engine.stats()
    with torch.inference_mode():
        assert torch.equal(prefill, original(input_ids=ids).logits)
        assert torch.equal(decode, original(input_ids=ids[:, :1]).logits)


def test_visit_recorder_and_sync_loads_change_nothing_computed():
    original, offloaded = _pair()
    engine = sida_moe.engine_of(offloaded)
    ids = torch.randint(3, 90, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode(), engine.observe(VisitRecorder()) as recorder, engine.observe(SyncLoads()):
        got = offloaded(input_ids=ids).logits
        step = offloaded(input_ids=ids[:, :1]).logits
        want = original(input_ids=ids).logits
    assert torch.equal(got, want) and torch.equal(step, original(input_ids=ids[:, :1]).logits)
    layers = len(engine.layers)
    assert len(recorder.trace) >= 2 * layers and recorder.trace.through_table[-layers:] == [True] * layers


def test_bad_observers_are_refused_before_anything_changes():
    _, offloaded = _pair()
    engine = sida_moe.engine_of(offloaded)
    with pytest.raises(TypeError, match="EngineObserver"):
        engine.add_observer(object())
    obs = engine.add_observer(EngineObserver())
    with pytest.raises(ValueError, match="already observes"):
        engine.add_observer(obs)
    engine.remove_observer(obs)
    with pytest.raises(ValueError, match="does not observe"):
        engine.remove_observer(obs)
    assert engine._observers == ()
