"""Routing replay (``sida_moe.bench.replay``): each MoE layer gets the recorded ids of its
mapped trace layer at its own offset, the device counter advances by each forward's tokens, the
cache sees those ids as its visits, and bad trace files fail in one line naming the file."""

from __future__ import annotations

import copy
import os
import sys

import numpy as np
import pytest
import torch

from _moe_models import eager_experts, tiny_model

from sida_moe.visit_trace import VisitRecorder
from sida_moe.bench import replay as rr

E, K = 8, 3  # tiny qwen3_moe: 8 experts, top-3


def _trace(path, tokens, layers, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.stack([[rng.permutation(E)[:K] for _ in range(layers)] for _ in range(tokens)]).astype(np.uint8)
    rr.save_routing_trace(str(path), ids, {"num_experts": E, "seq_len": tokens, "source": {"test": True}})
    return ids


def _expected(ids, num_layers, batch, seq, pos):
    """What the docstring promises: layer l reads trace layer l*L_t//L; its copy c counts the
    earlier layers mapped there; row b's token s is (pos + s + (b*C + c) * T // (B*C)) mod T."""
    tokens, trace_layers = ids.shape[:2]
    mapped = [l * trace_layers // num_layers for l in range(num_layers)]
    copy_of = [mapped[:l].count(mapped[l]) for l in range(num_layers)]
    copies = max(copy_of) + 1
    out = []
    for l in range(num_layers):
        rows = [(pos + s + (b * copies + copy_of[l]) * tokens // (batch * copies)) % tokens
                for b in range(batch) for s in range(seq)]
        out.append(torch.from_numpy(ids[rows, mapped[l]].astype(np.int64)))
    return out


def _record_ids(model):
    """ids each experts module receives, per forward (hooks run after the replay's)."""
    got = {}
    for i, (name, mod) in enumerate((n, m) for n, m in model.named_modules() if n.endswith("mlp.experts")):
        mod.register_forward_pre_hook(lambda m, a, i=i: got.setdefault(i, []).append(a[1].clone()))
    return got


@pytest.mark.parametrize("num_layers,trace_layers", [(6, 2), (6, 4), (3, 5)])
def test_layers_read_their_mapped_trace_layer_at_their_offsets_and_the_counter_advances(tmp_path, num_layers, trace_layers):
    tokens = 13  # prime: the streams' offsets wrap around the trace at different steps
    ids = _trace(tmp_path / "t.npz", tokens, trace_layers)
    model = eager_experts(tiny_model("qwen3_moe", num_hidden_layers=num_layers))
    replay = rr.ReplayRouting(model, rr.load_routing_trace(str(tmp_path / "t.npz")))
    got = _record_ids(model)
    batch, prompt, steps = 2, 4, 5
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        model(input_ids=torch.randint(3, 90, (batch, prompt), generator=g))  # a prefill: consumes 4 positions
        for _ in range(steps):
            model(input_ids=torch.randint(3, 90, (batch, 1), generator=g))
    assert int(replay.position) == prompt + steps
    calls = [(prompt, 0)] + [(1, prompt + i) for i in range(steps)]
    for f, (seq, pos) in enumerate(calls):
        want = _expected(ids, num_layers, batch, seq, pos)
        for l in range(num_layers):
            assert torch.equal(got[l][f], want[l]), (f, l)
    if num_layers > trace_layers:  # layers sharing a trace layer route differently
        assert not torch.equal(got[0][0], got[1][0])
    replay.reset(3)
    with torch.inference_mode():
        model(input_ids=torch.randint(3, 90, (1, 1), generator=g))
    assert torch.equal(got[0][-1], _expected(ids, num_layers, 1, 1, 3)[0])
    replay.remove()
    with torch.inference_mode():
        model(input_ids=torch.randint(3, 90, (1, 1), generator=g))
    assert int(replay.position) == 4  # hooks off: the counter stays


def test_the_cache_visits_are_the_replayed_ids(tmp_path):
    """On an offloaded model (host backend) the greedy loop's visits -- prefill and decode layers
    through the expert table -- are the trace's experts, so a cache simulation of the recorded
    visits simulates the replayed routing."""
    import sida_moe
    from sida_moe.decode_graph import static_generate

    ids = _trace(tmp_path / "t.npz", 17, 2, seed=1)
    model = sida_moe.offload(copy.deepcopy(eager_experts(tiny_model("qwen3_moe"))), gpu_budget="50%", policy="lru",
                             prefetch="none", copy_workers=0)
    engine = sida_moe.engine_of(model)
    replay = rr.ReplayRouting(model, rr.load_routing_trace(str(tmp_path / "t.npz")))
    batch, prompt, new = 2, 3, 4
    with torch.inference_mode(), engine.observe(VisitRecorder()) as recorder:
        visits = recorder.trace
        static_generate(model, torch.randint(3, 90, (batch, prompt)), new, graphs=False)
    assert int(replay.position) == prompt + new - 1
    layers = len(engine.layers)
    want = []
    for seq, pos in [(prompt, 0)] + [(1, prompt + i) for i in range(new - 1)]:
        want += [(l, sorted(set(x.reshape(-1).tolist()))) for l, x in enumerate(_expected(ids, layers, batch, seq, pos))]
    assert visits == want
    s = engine.stats()
    assert s["hits"] + s["misses"] == sum(len(e) for _, e in want)


def test_a_compiled_decode_step_keeps_the_replay_hooks(tmp_path):
    """torch.compile runs the replay hooks eagerly around its graphs: the compiled loop routes by
    the trace exactly as the eager one."""
    import sida_moe
    from sida_moe.decode_graph import static_generate

    _trace(tmp_path / "t.npz", 17, 2, seed=2)
    model = sida_moe.offload(copy.deepcopy(eager_experts(tiny_model("qwen3_moe"))), gpu_budget="50%", policy="lru",
                             prefetch="none")
    engine = sida_moe.engine_of(model)
    replay = rr.ReplayRouting(model, rr.load_routing_trace(str(tmp_path / "t.npz")))
    ids = torch.randint(3, 90, (2, 3), generator=torch.Generator().manual_seed(0))
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # trace afresh: code compiled by an earlier test would record no breaks
    counters.clear()
    runs = []
    for compile in (False, True):
        replay.reset(0)
        with torch.inference_mode(), engine.observe(VisitRecorder()) as recorder:
            visits = recorder.trace
            tokens = static_generate(model, ids, 5, graphs=False, compile=compile)
        runs.append((tokens, list(visits), int(replay.position)))
    assert runs[0][0].tolist() == runs[1][0].tolist()
    assert runs[0][1] == runs[1][1]  # the same replayed visits
    assert runs[0][2] == runs[1][2] == 3 + 5 - 1
    # the replay hooks are traced into the compiled graph: its only breaks are the engine's hooks
    # (a break inside a decoder layer would compile every layer apart, up to the recompile limit)
    assert counters["graph_break"] and all("_install_hooks" in reason for reason in counters["graph_break"])


@pytest.mark.parametrize("num_layers,trace_layers,batch", [(6, 2, 1), (6, 4, 3), (3, 5, 2)])
def test_decode_visits_are_the_replayed_decode_steps(tmp_path, num_layers, trace_layers, batch):
    ids = _trace(tmp_path / "t.npz", 13, trace_layers)
    trace = rr.load_routing_trace(str(tmp_path / "t.npz"))
    got = rr.decode_visits(trace, num_layers, batch, steps=4, start=5)
    want = [(l, sorted(set(x.reshape(-1).tolist())))
            for pos in range(5, 9) for l, x in enumerate(_expected(ids, num_layers, batch, 1, pos))]
    assert got == want


TRACE = os.path.join(os.path.dirname(__file__), "..", "benches", "data", "qwen3moe_128x8_stdlib_routing.npz")


@pytest.mark.parametrize("batch,steps", [(1, 400), (8, 200)])
def test_table_admission_holds_the_trained_trace_near_belady_with_few_copies(batch, steps):
    """The 30B shape's 48 layers replaying the committed trained-model trace at 25% of the
    experts: decode through the expert table admits a miss only over a less used expert, which
    keeps the hit rate within 0.8x of Belady's (every miss loaded, the whole future known) at
    bs1 and bs8 and moves far fewer bytes over the link than loading every miss (LRU thrashes
    on the cyclic layer walk at bs8)."""
    import sida_moe

    trace = rr.load_routing_trace(TRACE)
    visits = rr.decode_visits(trace, 48, batch, steps)
    slots = 48 * 128 // 4
    lookups = sum(len(e) for _, e in visits)
    belady = sida_moe.simulate_policy("predictive", slots, visits, future=True)
    for policy in ("lru", "lfu", "fifo"):
        every = sida_moe.simulate_policy(policy, slots, visits, future=False)
        table = sida_moe.simulate_policy(policy, slots, visits, future=False, path="table")
        assert table["hits"] + table["misses"] == lookups
        assert table["hits"] >= 0.8 * belady["hits"], (policy, table, belady)
        link = (table["misses"] + table["loads"]) / lookups  # experts over the link per lookup
        assert link < 0.6 * (every["misses"] + every["loads"]) / lookups, (policy, table, every)
    # fed the future, the table path's predictive policy is Belady's with bypass: never fewer hits
    assert sida_moe.simulate_policy("predictive", slots, visits, future=True, path="table")["hits"] >= belady["hits"]


def test_a_trace_of_other_experts_or_top_k_is_refused(tmp_path):
    ids = np.zeros((4, 2, 2), dtype=np.uint8)
    ids[..., 1] = 1
    rr.save_routing_trace(str(tmp_path / "k2.npz"), ids, {"num_experts": E, "seq_len": 4, "source": {}})
    want = r"k2\.npz: recorded with 8 experts top-2, but the model's MoE layers have 8 experts top-3"
    with pytest.raises(rr.RoutingTraceError, match=want):
        rr.ReplayRouting(tiny_model("qwen3_moe"), rr.load_routing_trace(str(tmp_path / "k2.npz")))


def _bad(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("case,message", [
    ("missing", "no such routing trace file"),
    ("not_npz", "not a routing trace (.npz"),
    ("no_ids", "no 'topk_ids' array"),
    ("bad_json", "metadata is not valid JSON"),
    ("wrong_format", "expected 'sida-moe-routing-trace'"),
    ("wrong_dtype", "topk_ids must be uint8 [tokens, layers, k], got int64"),
    ("wrong_shape", "but the metadata says tokens=5"),
    ("out_of_range", "expert id 9 out of range for num_experts=8"),
    ("repeats", "repeat an expert"),
])
def test_bad_trace_files_fail_in_one_line_naming_the_file(tmp_path, case, message):
    import json

    meta = {"format": rr.FORMAT, "version": rr.VERSION, "num_experts": 8, "top_k": 2, "layers": 1, "tokens": 4, "seq_len": 4}
    good = np.array([[[0, 1]]] * 4, dtype=np.uint8)
    path = tmp_path / f"{case}.npz"
    if case == "not_npz":
        path.write_text("hello")
    elif case == "no_ids":
        _bad(path, metadata=np.array(json.dumps(meta)))
    elif case == "bad_json":
        _bad(path, topk_ids=good, metadata=np.array("{"))
    elif case == "wrong_format":
        _bad(path, topk_ids=good, metadata=np.array(json.dumps(meta | {"format": "x"})))
    elif case == "wrong_dtype":
        _bad(path, topk_ids=good.astype(np.int64), metadata=np.array(json.dumps(meta)))
    elif case == "wrong_shape":
        _bad(path, topk_ids=good, metadata=np.array(json.dumps(meta | {"tokens": 5})))
    elif case == "out_of_range":
        _bad(path, topk_ids=good + 8, metadata=np.array(json.dumps(meta)))
    elif case == "repeats":
        _bad(path, topk_ids=np.zeros_like(good), metadata=np.array(json.dumps(meta)))
    with pytest.raises(rr.RoutingTraceError) as err:
        rr.load_routing_trace(str(path))
    text = str(err.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


@pytest.mark.gpu
def test_a_captured_decode_step_reads_the_next_trace_position_on_every_replay(tmp_path):
    """The counter lives on the device: each replay of the captured step routes by the next
    position (logged on the device by a hook captured with the step), as the eager loop does."""
    import sida_moe
    from sida_moe.decode_graph import static_generate

    ids = _trace(tmp_path / "t.npz", 29, 2, seed=2)
    model = sida_moe.offload(copy.deepcopy(tiny_model("qwen3_moe", torch.float16).cuda()), gpu_budget="25%",
                             policy="lru", prefetch="none")
    replay = rr.ReplayRouting(model, rr.load_routing_trace(str(tmp_path / "t.npz")))
    batch, prompt, new = 2, 5, 12
    experts = [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
    log = torch.full((len(experts), prompt + new, batch, K), -1, dtype=torch.long, device="cuda")

    def logger(i):
        def hook(m, a):
            if a[1].shape[0] == batch:  # decode steps: [B, k] at position counter - 1
                log[i].index_copy_(0, replay.position - 1, a[1].view(1, batch, K))
        return hook

    for i, m in enumerate(experts):
        m.register_forward_pre_hook(logger(i))
    ids_in = torch.randint(3, 90, (batch, prompt), device="cuda")
    with torch.inference_mode():
        eager = static_generate(model, ids_in, new, graphs=False)
        eager_log = log.clone()
        assert int(replay.position) == prompt + new - 1
        log.fill_(-1)
        replay.reset(0)
        graphed = static_generate(model, ids_in, new, graphs=True)
        assert model._sida_decode_steps and all(s.graph is not None for s in model._sida_decode_steps.values())
        assert int(replay.position) == prompt + new - 1
    assert torch.equal(log, eager_log)
    assert torch.equal(graphed, eager)
    for p in range(prompt, prompt + new - 1):
        want = _expected(ids, len(experts), batch, 1, p)
        for l in range(len(experts)):
            assert torch.equal(log[l, p].cpu(), want[l]), (p, l)


@pytest.mark.slow
def test_train_and_record_pipeline_runs_on_the_cpu(tmp_path):
    """The GPU recipe in miniature: train_reference_model.py (a few steps, 16 experts top-4) then
    record_routing_trace.py; row t of the trace holds the experts each router picked for token t."""
    import json
    import subprocess

    from transformers import AutoModelForCausalLM, AutoTokenizer

    benches = os.path.join(os.path.dirname(__file__), "..", "benches")
    model_dir, out = tmp_path / "ref", tmp_path / "trace.npz"
    train = [sys.executable, os.path.join(benches, "train_reference_model.py"), "--out", str(model_dir), "--device", "cpu",
             "--steps", "2", "--max-files", "6", "--vocab-size", "300", "--seq-len", "32", "--batch-size", "2",
             "--hidden", "64", "--experts", "16", "--top-k", "4", "--expert-size", "16", "--layers", "2"]
    run = subprocess.run(train, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    record = [sys.executable, os.path.join(benches, "record_routing_trace.py"), "--model", str(model_dir), "--out", str(out),
              "--tokens", "100", "--device", "cpu"]
    run = subprocess.run(record, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    trace = rr.load_routing_trace(str(out))
    assert trace.topk_ids.shape == (96, 2, 4)  # 100 tokens rounded down to 3 sequences of 32
    assert trace.num_experts == 16 and trace.metadata["seq_len"] == 32
    assert trace.metadata["source"]["train_steps"] == 2

    split = json.loads((model_dir / "split.json").read_text())
    docs = [(p, open(os.path.join(split["corpus"], p), encoding="utf-8", errors="replace").read())
            for p in split["held_out_files"]]
    sys.path.insert(0, benches)  # the bench scripts are not a package
    import train_reference_model as ref

    seqs = ref.tokenize(AutoTokenizer.from_pretrained(model_dir), docs, 32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    picked = {}
    for name, mod in model.named_modules():
        if name.endswith("mlp.gate"):
            layer = int(name.split(".")[2])
            mod.register_forward_hook(lambda m, a, o, layer=layer: picked.__setitem__(layer, o[2]))
    with torch.no_grad():
        model(input_ids=seqs[1:2])
    for layer in range(2):
        assert torch.equal(torch.from_numpy(trace.topk_ids[32:64, layer].astype(np.int64)), picked[layer]), layer
