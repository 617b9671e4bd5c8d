"""CPU tests of the SiDA predictor: sparsemax, the hash-function network, traces, training,
hash routing, the cache simulation and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from sida_moe.adapters import decoder_moe_layers
from sida_moe.predictor import (
    HashPredictor,
    HashRouting,
    PredictorConfig,
    has_predictor,
    sparsemax,
)
from sida_moe.train import RoutingRecorder, TrainConfig, evaluate, load_traces, record_traces, train_predictor
from sida_moe.train.cachesim import simulate_decode
from sida_moe.predictor.hash_routing import hash_route
from sida_moe.train.traces import chunk_token_ids, split_held_out
from sida_moe.train.evaluation import TEMPERATURE_GRID, fit_weight_temperature, weight_errors
from sida_moe.train.predictor_training import distillation_loss, predictor_config_for


def tiny_qwen3(seed: int = 0, layers: int = 3, experts: int = 8, top_k: int = 2):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True,
                         max_position_embeddings=128)
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights: routing without ties
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_qwen3()


@pytest.fixture(scope="module")
def trace_dir(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("trace")
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, 64, (10, 16), generator=g)
    record_traces(model, seqs, out, batch_size=3, top_t=5, shard_sequences=4, progress=False)
    return out


# ------------------------------------------------------------------------------------ sparsemax
def test_sparsemax_known_values():
    out = sparsemax(torch.tensor([1.0, 0.5, -1.0]))
    assert torch.allclose(out, torch.tensor([0.75, 0.25, 0.0]))
    assert torch.allclose(sparsemax(torch.zeros(4)), torch.full((4,), 0.25))
    assert torch.equal(sparsemax(torch.tensor([5.0, 0.0, 0.0])), torch.tensor([1.0, 0.0, 0.0]))


def test_sparsemax_is_a_sparse_distribution():
    torch.manual_seed(0)
    z = torch.randn(64, 20) * 3
    p = sparsemax(z, dim=-1)
    assert torch.allclose(p.sum(-1), torch.ones(64), atol=1e-5)
    assert (p >= 0).all()
    assert (p == 0).any(dim=-1).all(), "every row of spread scores has zeros"
    # along another dim, and order-preserving
    q = sparsemax(z.t(), dim=0)
    assert torch.allclose(q.t(), p)
    assert (p.argmax(-1) == z.argmax(-1)).all()


def test_sparsemax_is_the_simplex_projection():
    # the Euclidean projection onto the simplex, by a bisection on the threshold
    torch.manual_seed(1)
    z = torch.randn(10, 7)
    lo, hi = z.min(-1, keepdim=True).values - 1, z.max(-1, keepdim=True).values
    for _ in range(100):
        mid = (lo + hi) / 2
        too_big = torch.clamp(z - mid, min=0).sum(-1, keepdim=True) > 1
        lo, hi = torch.where(too_big, mid, lo), torch.where(too_big, hi, mid)
    assert torch.allclose(sparsemax(z), torch.clamp(z - (lo + hi) / 2, min=0), atol=1e-5)


def test_sparsemax_masked_scores_get_zero_and_gradients_flow():
    z = torch.tensor([[0.3, -1e9, 0.1]], requires_grad=True)
    p = sparsemax(z)
    assert p[0, 1] == 0
    p[0, 0].backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_sparsemax_rejects_integers():
    with pytest.raises(TypeError, match="floating-point"):
        sparsemax(torch.tensor([1, 2, 3]))


# ------------------------------------------------------------------------------------ network
def test_predictor_size_matches_the_paper():
    # SiDA's 256-wide network has ~1.3-1.7M parameters for Switch-base (hidden 768, 6 sparse layers
    # per stack, 8-256 experts); same shape here with 128 experts
    p = HashPredictor(PredictorConfig(input_dim=768, num_moe_layers=6, num_experts=128, top_k=1))
    assert 1.2e6 < p.num_parameters() < 1.8e6


@pytest.mark.parametrize("head_hidden,attn_blocks", [(0, 0), (12, 0), (0, 2)])
def test_predictor_incremental_equals_full_and_is_causal(head_hidden, attn_blocks):
    torch.manual_seed(0)
    p = HashPredictor(PredictorConfig(input_dim=16, num_moe_layers=2, num_experts=6, top_k=2, hidden=24,
                                      head_hidden=head_hidden, attn_blocks=attn_blocks, attn_heads=4)).eval()
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        full, _ = p(x)
        state, steps = None, []
        for t in range(9):
            out, state = p(x[:, t : t + 1], state)
            steps.append(out)
        # a prefix of 4 then 5 more tokens
        a, st = p(x[:, :4])
        b, _ = p(x[:, 4:], st)
        changed = x.clone()
        changed[:, 6:] = torch.randn(2, 3, 16)
        full_changed, _ = p(changed)
    assert full.shape == (2, 2, 9, 6)
    assert torch.allclose(torch.cat(steps, dim=2), full, atol=1e-5)
    with torch.no_grad():  # an all-ones mask is the same as none, in one call or token by token
        masked, _ = p(x, attention_mask=torch.ones(2, 9))
        s1 = p(x[:, :5], attention_mask=torch.ones(2, 5))[1]
        tail, _ = p(x[:, 5:], s1)
    assert torch.allclose(masked, full, atol=1e-6)
    assert torch.allclose(tail, full[:, :, 5:], atol=1e-5)
    assert torch.allclose(torch.cat([a, b], dim=2), full, atol=1e-5)
    assert torch.allclose(full_changed[:, :, :6], full[:, :, :6], atol=1e-6), "later tokens changed earlier predictions"
    assert not torch.allclose(full_changed[:, :, 6:], full[:, :, 6:])


@pytest.mark.parametrize("attn_blocks", [0, 2])
def test_predictor_masks_padding_out_of_the_attention(attn_blocks):
    """A left-padded row: the mask changes what real tokens attend to, padding keys get no weight,
    and decoding on from the masked state is the same as predicting the whole row at once."""
    torch.manual_seed(0)
    p = HashPredictor(PredictorConfig(input_dim=16, num_moe_layers=1, num_experts=6, top_k=2, hidden=24,
                                      attn_blocks=attn_blocks, attn_heads=4)).eval()
    x = torch.randn(1, 8, 16)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        feats, state = p.features(x[:, :6], attention_mask=mask)
        unmasked, _ = p.features(x[:, :6])
        whole, _ = p.features(x, attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]]))
        step1, s1 = p.features(x[:, 6:7], state)
        step2, _ = p.features(x[:, 7:8], s1)
    assert state.key_mask.tolist() == [[False, False, True, True, True, True]]
    assert not torch.allclose(feats[:, 2:], unmasked[:, 2:]), "the mask must change what real tokens attend to"
    assert torch.isfinite(feats).all()
    assert torch.allclose(torch.cat([feats, step1, step2], dim=1)[:, 2:], whole[:, 2:], atol=1e-5)


def test_predictor_is_scale_free_in_its_input():
    torch.manual_seed(0)
    p = HashPredictor(PredictorConfig(input_dim=16, num_moe_layers=2, num_experts=6, top_k=2, hidden=24)).eval()
    x = torch.randn(1, 5, 16)
    with torch.no_grad():
        assert torch.allclose(p(x)[0], p(x * 0.02)[0], atol=1e-4)


def test_dropout_acts_in_training_only(trace_dir, tmp_path):
    """Dropout (a training setting, TrainConfig.dropout) changes nothing in eval mode -- the SiDA
    prefetcher and the CUDA graph see the plain network -- acts while training, and is not saved."""
    torch.manual_seed(0)
    cfg = PredictorConfig(input_dim=16, num_moe_layers=2, num_experts=6, top_k=2, hidden=24, attn_blocks=1,
                          attn_heads=4)
    p = HashPredictor(cfg, dropout=0.3)
    plain = HashPredictor(cfg)
    plain.load_state_dict(p.state_dict())
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert torch.equal(p.eval()(x)[0], plain.eval()(x)[0])
        p.train()
        assert not torch.allclose(p(x)[0], plain(x)[0])
    for bad in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\)"):
            HashPredictor(cfg, dropout=bad)
        with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\)"):
            TrainConfig(dropout=bad)
    traces = load_traces(trace_dir)
    settings = dict(steps=3, batch_size=4, hidden=16, fit_gate=False)
    pred, report = train_predictor(traces, TrainConfig(dropout=0.2, **settings), progress=False)
    _, without = train_predictor(traces, TrainConfig(**settings), progress=False)
    assert report["loss_first"] != without["loss_first"]  # the same seed: only dropout differs
    assert report["train_config"]["dropout"] == 0.2 and "dropout" not in report["predictor_config"]
    assert pred.dropout == 0.0 and not pred.training
    pred.save(tmp_path)
    assert "dropout" not in json.loads((tmp_path / "predictor.json").read_text())


@pytest.mark.parametrize("head_hidden,attn_blocks", [(0, 0), (10, 0), (10, 1)])
def test_predictor_save_load_round_trip(tmp_path, head_hidden, attn_blocks):
    torch.manual_seed(0)
    cfg = PredictorConfig(input_dim=16, num_moe_layers=3, num_experts=6, top_k=2, hidden=24,
                          moe_layer_ids=[1, 2, 4], model_type="qwen3_moe", head_hidden=head_hidden,
                          attn_blocks=attn_blocks, attn_heads=3)
    p = HashPredictor(cfg).eval()
    assert not has_predictor(tmp_path)
    p.save(tmp_path)
    assert has_predictor(tmp_path)
    q = HashPredictor.load(tmp_path)
    assert q.config == cfg
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert torch.equal(p(x)[0], q(x)[0])


_EARLIER_DEFAULTS = {"prev_token_routing": False, "conditioned": False, "lookahead_previous_token": False,
                     "dropout": 0.0}


def test_predictor_json_of_earlier_versions_loads_unless_it_names_a_removed_variant(tmp_path):
    """A predictor.json written before the decode / conditioned variants, the heads without the
    previous token's state and the saved training dropout were removed loads when those fields
    hold values that describe the network built now (their old defaults; previous-token heads;
    any training dropout), and raises a ValueError naming the field otherwise."""
    torch.manual_seed(0)
    p = HashPredictor(PredictorConfig(input_dim=16, num_moe_layers=3, num_experts=6, top_k=2, hidden=24)).eval()
    p.save(tmp_path)
    saved = json.loads((tmp_path / "predictor.json").read_text())
    x = torch.randn(1, 4, 16)

    def load_with(**fields):
        (tmp_path / "predictor.json").write_text(json.dumps({**saved, **fields}))
        return HashPredictor.load(tmp_path)

    with torch.no_grad():
        assert torch.equal(load_with(**_EARLIER_DEFAULTS)(x)[0], p(x)[0])
    assert load_with(dropout=0.2).config == p.config  # a training setting: the same network
    assert load_with(lookahead_previous_token=True).lookahead is None  # no heads: the flag meant nothing
    for name, value in (("prev_token_routing", True), ("conditioned", True), ("lookahead_previous_token", False),
                        ("dropout", 1.5), ("dropout", "0.1")):
        fields = {"lookahead_hidden": 8} if name == "lookahead_previous_token" else {}
        with pytest.raises(ValueError, match=rf"predictor config field {name}="):
            load_with(**{**_EARLIER_DEFAULTS, **fields, name: value})
    with pytest.raises(ValueError, match="the conditioned variant .* only false loads"):
        load_with(conditioned=True)
    # heads that read the previous token's state (every head now) load with their weights
    p.add_lookahead(8)
    p.save(tmp_path)
    saved = json.loads((tmp_path / "predictor.json").read_text())
    assert load_with(**{**_EARLIER_DEFAULTS, "lookahead_previous_token": True}).config.lookahead_hidden == 8
    with pytest.raises(ValueError, match="lookahead_previous_token=False names lookahead heads that do not read"):
        load_with(lookahead_previous_token=False)


def test_the_bundled_predictor_loads():
    """The bundled checkpoint's predictor.json was written with every field since removed."""
    from sida_moe.presets import bundled_model_path

    path = bundled_model_path("qwen3-moe-stdlib")
    saved = json.loads(open(f"{path}/predictor.json").read())
    assert set(_EARLIER_DEFAULTS) <= set(saved)
    pred = HashPredictor.load(path)
    assert (pred.config.attn_blocks, pred.config.lookahead_hidden, pred.lookahead is not None) == (2, 256, True)


def test_predictor_errors(tmp_path):
    with pytest.raises(ValueError, match="top_k"):
        PredictorConfig(input_dim=8, num_moe_layers=1, num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="num_experts"):
        PredictorConfig(input_dim=8, num_moe_layers=1, num_experts=0, top_k=1)
    with pytest.raises(ValueError, match="moe_layer_ids"):
        PredictorConfig(input_dim=8, num_moe_layers=2, num_experts=4, top_k=1, moe_layer_ids=[0])
    with pytest.raises(ValueError, match="head_hidden must be >= 0"):
        PredictorConfig(input_dim=8, num_moe_layers=1, num_experts=4, top_k=1, head_hidden=-1)
    with pytest.raises(ValueError, match="attn_blocks must be >= 0"):
        PredictorConfig(input_dim=8, num_moe_layers=1, num_experts=4, top_k=1, attn_blocks=-1)
    with pytest.raises(ValueError, match=r"attn_heads must be a positive divisor of hidden \(24\)"):
        PredictorConfig(input_dim=8, num_moe_layers=1, num_experts=4, top_k=1, hidden=24, attn_blocks=1, attn_heads=5)
    with pytest.raises(ValueError, match="unknown predictor config keys"):
        PredictorConfig.from_dict({"input_dim": 8, "num_moe_layers": 1, "num_experts": 4, "top_k": 1, "bogus": 1})
    p = HashPredictor(PredictorConfig(input_dim=8, num_moe_layers=1, num_experts=4, top_k=1))
    with pytest.raises(ValueError, match=r"embeds must be \[batch, seq, 8\]"):
        p(torch.randn(1, 3, 9))
    with pytest.raises(FileNotFoundError, match="missing predictor.json"):
        HashPredictor.load(tmp_path)


# ------------------------------------------------------------------------------------- traces
def test_decoder_moe_layers(model):
    layers = decoder_moe_layers(model)
    assert [(l.ordinal, l.decoder_layer, l.num_experts, l.top_k) for l in layers] == [(0, 0, 8, 2), (1, 1, 8, 2), (2, 2, 8, 2)]
    with pytest.raises(ValueError, match="no MoE blocks"):
        decoder_moe_layers(torch.nn.Linear(2, 2))


def test_trace_round_trip(model, trace_dir):
    traces = load_traces(trace_dir)
    m = traces.manifest
    assert (m["num_moe_layers"], m["num_experts"], m["top_k"], m["top_t"], m["seq_len"]) == (3, 8, 2, 5, 16)
    assert [s["num_sequences"] for s in m["shards"]] == [6, 4]  # flushed once 4+ sequences are buffered
    assert traces.topk_ids.shape == (3, 10, 16, 2) and traces.logit_ids.shape == (3, 10, 16, 5)
    assert torch.equal(traces.embeddings, model.get_input_embeddings().weight.detach())
    # the recorded routing is the model's: recompute it for two sequences
    with RoutingRecorder(model) as rec, torch.no_grad():
        model(input_ids=traces.input_ids[3:5])
    for layer in range(3):
        assert torch.equal(rec.layer_topk(layer).view(2, 16, 2), traces.topk_ids[layer, 3:5])
        logits = rec.layer_logits(layer).view(2, 16, 8)
        vals, ids = logits.topk(5, dim=-1)
        assert torch.equal(ids, traces.logit_ids[layer, 3:5])
        assert torch.allclose(vals, traces.logit_vals[layer, 3:5], atol=1e-2)
    # softmax routing: the router's top-1 logit is one of the chosen experts
    assert (traces.logit_ids[..., :1] == traces.topk_ids).any(-1).all()


def test_trace_records_the_next_layer_gate(model, trace_dir, tmp_path):
    """gate_ids/vals of layer l: layer l's router applied to what layer l-1's router saw; recording
    it changes nothing else, and a trace recorded without it loads with no gate."""
    traces = load_traces(trace_dir)
    assert traces.manifest["next_layer_gate"] and traces.gate_ids.shape == (2, 10, 16, 5)
    layers = decoder_moe_layers(model)
    seen = {}
    hooks = [l.router.register_forward_pre_hook(lambda m, a, i=l.ordinal: seen.__setitem__(i, a[0])) for l in layers]
    try:
        with torch.no_grad():
            model(input_ids=traces.input_ids[3:5])
    finally:
        for h in hooks:
            h.remove()
    for l in (1, 2):
        with torch.no_grad():
            expect = layers[l].router.forward(seen[l - 1])[0].reshape(2, 16, 8)
        vals, ids = expect.topk(5, dim=-1)
        assert torch.equal(ids, traces.gate_ids[l - 1, 3:5])
        assert torch.allclose(vals, traces.gate_vals[l - 1, 3:5], atol=1e-2)
        # not the layer's own router input: a different hidden state, different logits
        assert not torch.allclose(expect.reshape(-1, 8), layers[l].router.forward(seen[l])[0].reshape(-1, 8))
    plain = record_traces(model, traces.input_ids[:2], tmp_path, top_t=5, progress=False, next_layer_gate=False)
    assert plain["next_layer_gate"] is False and load_traces(tmp_path).gate_ids is None
    again = load_traces(tmp_path)
    assert torch.equal(again.topk_ids, traces.topk_ids[:, :2]) and torch.equal(again.logit_ids, traces.logit_ids[:, :2])


def test_traces_of_several_corpora_load_together_and_compact(model, trace_dir, tmp_path):
    """A second corpus' trace of the same model is appended in order; compact loading keeps the
    on-disk dtypes and trains and evaluates like the widened copy; a trace of another recording
    (or another model) is refused with the key that differs."""
    from sida_moe.train.batches import TraceBatches

    g = torch.Generator().manual_seed(1)
    extra = tmp_path / "extra"
    record_traces(model, torch.randint(0, 64, (3, 16), generator=g), extra, batch_size=3, top_t=5, progress=False)
    one, two = load_traces(trace_dir), load_traces(extra)
    both = load_traces(trace_dir, extra)
    assert both.num_sequences == 13 and both.manifest["num_sequences"] == 13
    assert both.manifest["sources"] == [str(trace_dir), str(extra)]
    for name in ("input_ids", "topk_ids", "logit_ids", "logit_vals", "gate_ids", "gate_vals"):
        dim = 0 if name == "input_ids" else 1
        assert torch.equal(getattr(both, name), torch.cat([getattr(one, name), getattr(two, name)], dim=dim)), name
    small = load_traces(trace_dir, extra, compact=True)
    assert (small.input_ids.dtype, small.topk_ids.dtype, small.logit_vals.dtype, small.gate_ids.dtype) == (
        torch.int32, torch.int16, torch.float16, torch.int16)
    rows = torch.tensor([12, 0, 5])
    for a, b in zip(TraceBatches(both, torch.device("cpu"), 3, resident=False)(rows),
                    TraceBatches(small, torch.device("cpu"), 3, resident=False)(rows)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    pred, _ = train_predictor(small, TrainConfig(steps=3, batch_size=4, fit_gate=False), progress=False)
    assert evaluate(pred, small)["mean_recall@2"] == pytest.approx(evaluate(pred, both)["mean_recall@2"])
    other = tmp_path / "other"
    record_traces(model, torch.randint(0, 64, (3, 16), generator=g), other, top_t=4, progress=False)
    with pytest.raises(ValueError, match=r"does not match .* in \['top_t'\]"):
        load_traces(trace_dir, other)


def test_fused_correction_weights_are_fitted_and_saved(trace_dir, tmp_path):
    """fit_gate_weights picks, per layer >= 1, the grid weight with the best recall on the trace; the
    held-out report's fused recall is that recall; the weights survive save/load."""
    from sida_moe.train.evaluation import fit_gate_weights

    traces = load_traces(trace_dir)
    cfg = TrainConfig(steps=40, batch_size=8, warmup_steps=5, lr=3e-3, target="topk", fit_gate=False)
    pred, report = train_predictor(traces, cfg, progress=False)
    assert "gate_fit" not in report and pred.config.gate_weights == []
    with pytest.raises(ValueError, match="no fitted gate_weights"):
        pred.fuse(torch.zeros(8), 1, torch.zeros(8))
    fit = fit_gate_weights(pred, traces, grid=(0.0, 1.0, 1e6))
    weights = pred.config.gate_weights
    assert len(weights) == 3 and weights[0] == 0.0
    by_weight = {float(w): r for w, r in fit["recall_by_weight"].items()}
    for l in (1, 2):
        assert by_weight[weights[l]][l] == max(r[l] for r in by_weight.values())
    held = evaluate(pred, traces)
    for l in (1, 2):
        assert held["per_layer"][l]["fused_recall@2"] == pytest.approx(by_weight[weights[l]][l])
        # a huge weight is the gate alone
        assert by_weight[1e6][l] == pytest.approx(held["per_layer"][l]["gate_recall@2"])
    assert held["per_layer"][0]["fused_recall@2"] == held["per_layer"][0]["recall@2"]
    pred.save(tmp_path)
    assert HashPredictor.load(tmp_path).config.gate_weights == weights
    with pytest.raises(ValueError, match="gate_weights has 2 entries"):
        PredictorConfig(input_dim=8, num_moe_layers=3, num_experts=4, top_k=1, gate_weights=[0.0, 1.0])
    _, trained = train_predictor(traces, TrainConfig(steps=5, batch_size=4), held_out=traces, progress=False)
    assert trained["gate_fit"]["gate_weights"][0] == 0.0 and "mean_fused_recall@2" in trained["held_out"]


def test_trace_input_errors(model, tmp_path):
    with pytest.raises(ValueError, match="2-D integer tensor"):
        record_traces(model, torch.rand(2, 4), tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="not a trace directory"):
        load_traces(tmp_path)
    with pytest.raises(ValueError, match="fewer than one sequence"):
        chunk_token_ids([[1, 2]], 8)


def test_chunks_and_held_out_split():
    rows = chunk_token_ids([[1, 2, 3], [4, 5]], 3, separator=0)
    assert rows.tolist() == [[1, 2, 3], [0, 4, 5]]
    docs = [(f"f{i}.py", "x") for i in range(200)]
    train, held = split_held_out(docs, 0.1)
    assert len(train) + len(held) == 200 and 5 < len(held) < 40
    assert split_held_out(docs, 0.1) == (train, held), "the split must be deterministic"
    with pytest.raises(ValueError, match="held_out_fraction"):
        split_held_out(docs, 1.5)


# ------------------------------------------------------------------------------------ training
def test_distillation_loss_terms():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 6)
    topk = torch.randint(0, 6, (2, 3, 4, 2))
    vals, ids = logits.topk(4, dim=-1)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 6), ids[..., 0].reshape(-1))
    assert torch.allclose(distillation_loss(logits, topk, ids, vals, 0.0, 4), ce)
    # the student equals the teacher on the top-T experts: the distillation term is zero
    assert torch.allclose(distillation_loss(logits, topk, ids, vals, 10.0, 4), ce, atol=1e-5)
    # a teacher that disagrees adds a positive term
    assert distillation_loss(logits, topk, ids, vals.flip(-1), 10.0, 4) > ce + 1e-3


@pytest.mark.parametrize("head_hidden,attn_blocks", [(0, 0), (32, 0), (32, 1)])
def test_training_lowers_the_loss_and_reports(trace_dir, head_hidden, attn_blocks):
    traces = load_traces(trace_dir)
    cfg = TrainConfig.preset("paper", steps=80, batch_size=8, warmup_steps=5, lr=3e-3, target="topk",
                             head_hidden=head_hidden, attn_blocks=attn_blocks)
    pred, report = train_predictor(traces, cfg, held_out=traces, progress=False)
    assert pred.config.head_hidden == head_hidden
    assert len(pred.blocks) == attn_blocks
    assert report["loss_last_50"] < 0.8 * report["loss_first"]
    held = report["held_out"]
    assert held["tokens"] == 160 and len(held["per_layer"]) == 3
    for row in held["per_layer"]:
        assert 0.0 <= row["recall@2"] <= 1.0 and row["recall@2"] == pytest.approx(row["precision@2"])
        assert row["recall@4"] >= row["recall@2"]
    # fitted on these very sequences, it must beat chance (2 of 8 experts: 0.25) clearly
    assert held["mean_recall@2"] > 0.4
    again = evaluate(pred, traces)
    assert again["mean_recall@2"] == pytest.approx(held["mean_recall@2"])


def _routing_by_token(traces, lag: int, sequences: int = 96):
    """A trace of ``traces``' model over new random ``sequences`` (every token id seen often) with
    every layer routing token t to experts chosen by the id of token t - lag (the first ``lag``
    tokens by their own), the router's logits ranking those two first."""
    input_ids = torch.randint(0, 64, (sequences, traces.input_ids.shape[1]), generator=torch.Generator().manual_seed(1))
    ids = input_ids.clone()
    if lag:
        ids[:, lag:] = input_ids[:, :-lag]
    first = ids % 8
    second = (first + 1 + (ids // 8) % 7) % 8
    L, (N, S) = traces.topk_ids.shape[0], input_ids.shape
    top = torch.stack([first, second], dim=-1).expand(L, N, S, 2)
    rest = torch.stack([(first + j) % 8 for j in range(2, 8)], dim=-1)
    rest = rest.masked_fill(rest == second[..., None], -1)  # ranked after the two, each expert once
    order = torch.cat([top[0], rest], dim=-1)
    order = torch.stack([row[row >= 0][:5] for row in order.reshape(-1, 8)]).reshape(N, S, 5).expand(L, N, S, 5)
    vals = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]).expand(L, N, S, 5)
    from sida_moe.train.trace_loading import Traces

    return Traces(traces.manifest, input_ids, top.clone(), order.clone(), vals.clone(), traces.embeddings)


def test_a_next_token_predictor_learns_the_next_tokens_routing(trace_dir):
    """target_shift=1 pairs token t's inputs with token t+1's routing, in training and in
    evaluate: routing set by the token before it is learned; routing set by the token itself is
    not (the next token is unknown), while an own-routing predictor learns that one."""
    traces = load_traces(trace_dir)
    cfg = dict(steps=150, batch_size=8, warmup_steps=5, lr=3e-3, target="topk", head_hidden=32, fit_gate=False)
    train, held = slice(0, 80), slice(80, 96)  # held-out sequences: a memorised one predicts anything
    by_previous, by_own = _routing_by_token(traces, lag=1), _routing_by_token(traces, lag=0)
    ahead, report = train_predictor(by_previous.subset(train), TrainConfig.preset("paper", target_shift=1, **cfg),
                                    held_out=by_previous.subset(held), progress=False)
    assert ahead.config.target_shift == 1
    assert report["held_out"]["tokens"] == 16 * 15  # every token but each sequence's last
    assert report["held_out"]["mean_recall@2"] > 0.8
    blind, _ = train_predictor(by_own.subset(train), TrainConfig.preset("paper", target_shift=1, **cfg),
                               progress=False)
    own, _ = train_predictor(by_own.subset(train), TrainConfig.preset("paper", **cfg), progress=False)
    assert evaluate(blind, by_own.subset(held))["mean_recall@2"] < 0.5
    assert evaluate(own, by_own.subset(held))["mean_recall@2"] > 0.8


def test_a_next_token_predictor_is_saved_and_refused_by_hash_routing(model, trace_dir, tmp_path):
    from sida_moe.predictor import SidaPrefetcher

    traces = load_traces(trace_dir)
    pred, report = train_predictor(traces, TrainConfig.preset("paper", steps=2, batch_size=4, target_shift=1),
                                   progress=False)
    assert "temperature_fit" not in report  # hash routing's weights are not for it
    pred.save(tmp_path)
    assert HashPredictor.load(tmp_path).config.target_shift == 1
    assert SidaPrefetcher(pred).predictor is pred  # served, its predictions a step further on
    with pytest.raises(ValueError, match="target_shift=1"):
        HashRouting(model, pred)
    with pytest.raises(ValueError, match="target_shift must be 0"):
        TrainConfig(target_shift=2)
    with pytest.raises(ValueError, match="target_shift must be 0"):
        PredictorConfig(input_dim=32, num_moe_layers=2, num_experts=8, top_k=2, target_shift=-1)


def test_device_resident_batches_match_the_host_path(trace_dir):
    """The compact copy a GPU trains from (int16 ids, fp16 logits, top-T columns only) gives the same
    batches as gathering on the host, up to fp16 rounding of the logits."""
    from sida_moe.train.batches import TraceBatches

    traces = load_traces(trace_dir)
    cpu = torch.device("cpu")
    host, compact = TraceBatches(traces, cpu, top_t=3, resident=False), TraceBatches(traces, cpu, top_t=3, resident=True)
    assert compact.logit_ids.dtype == torch.int16 and compact.logit_vals.dtype == torch.float16
    rows = torch.tensor([3, 0, 3, 1])
    for a, b in zip(host(rows), compact(rows)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-3)
    assert host(rows)[2].shape[-1] == 3 and torch.equal(host(rows)[1], traces.topk_ids[:, rows])


def test_training_rejects_bad_settings(trace_dir):
    with pytest.raises(ValueError, match="target"):
        TrainConfig(target="top3")
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="head_hidden"):
        TrainConfig(head_hidden=-2)
    with pytest.raises(ValueError, match="attn_blocks"):
        TrainConfig(attn_blocks=-1)
    with pytest.raises(ValueError, match="bf16=True needs a CUDA training device"):
        TrainConfig(bf16=True, device="cpu")
    traces = load_traces(trace_dir)
    wrong = HashPredictor(PredictorConfig(input_dim=32, num_moe_layers=2, num_experts=8, top_k=2))
    with pytest.raises(ValueError, match="do not match"):
        train_predictor(traces, TrainConfig(steps=1), predictor=wrong, progress=False)
    with pytest.raises(ValueError, match="k must be"):
        evaluate(HashPredictor(predictor_config_for(traces.manifest)), traces, k=9)


# --------------------------------------------------------------------------------- hash routing
def _rigged_predictor(model, favourite: list[int], second: int) -> HashPredictor:
    """A predictor whose logits are constant: ``favourite[l]`` first, ``second`` next, per layer."""
    layers = decoder_moe_layers(model)
    p = HashPredictor(PredictorConfig(input_dim=32, num_moe_layers=len(layers), num_experts=8, top_k=2, hidden=16))
    with torch.no_grad():
        p.heads.weight.zero_()
        bias = p.heads.bias.view(len(layers), 8)  # one row of head biases per MoE layer
        bias.fill_(-5.0)
        for l in range(len(layers)):
            bias[l, favourite[l]] = 3.0
            bias[l, second] = 2.0
    return p.eval()


def test_hash_routing_replaces_the_router(model):
    pred = _rigged_predictor(model, [5, 6, 7], second=0)
    x = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        exact = model(input_ids=x).logits
        with HashRouting(model, pred, "predicted"), RoutingRecorder(model) as rec:
            hashed = model(input_ids=x).logits
        after = model(input_ids=x).logits
    for l, fav in enumerate([5, 6, 7]):
        assert rec.layer_topk(l).tolist() == [[fav, 0]] * 14
    assert not torch.allclose(hashed, exact)
    assert torch.equal(after, exact), "leaving the context must restore the router"


def test_hash_routing_with_oracle_weights_is_exact(model):
    """Experts and weights taken from the router itself (an oracle predictor) reproduce the model."""
    x = torch.randint(0, 64, (1, 9))
    with torch.no_grad(), RoutingRecorder(model) as rec:
        exact = model(input_ids=x).logits
    oracle = torch.stack([rec.layer_logits(l) for l in range(3)])  # [L, T, E]

    class Oracle(HashPredictor):
        def forward(self, embeds, state=None, attention_mask=None):
            return oracle.view(3, 1, 9, 8), state

    pred = Oracle(PredictorConfig(input_dim=32, num_moe_layers=3, num_experts=8, top_k=2, hidden=8))
    with torch.no_grad():
        for weights in ("predicted", "router"):
            with HashRouting(model, pred, weights):
                assert torch.allclose(model(input_ids=x).logits, exact, atol=1e-5)


def test_hash_routing_predicted_weights_use_the_fitted_temperature(model):
    """A predictor whose logits are the router's times 2 picks the right experts but too sharp
    weights; its fitted temperature 2 makes the predicted weights the router's (exact output)."""
    x = torch.randint(0, 64, (1, 9))
    with torch.no_grad(), RoutingRecorder(model) as rec:
        exact = model(input_ids=x).logits
    sharp = 2.0 * torch.stack([rec.layer_logits(l) for l in range(3)])  # [L, T, E]

    class Sharp(HashPredictor):
        def forward(self, embeds, state=None, attention_mask=None):
            return sharp.view(3, 1, 9, 8), state

    pred = Sharp(PredictorConfig(input_dim=32, num_moe_layers=3, num_experts=8, top_k=2, hidden=8))
    with torch.no_grad():
        with HashRouting(model, pred, "predicted"):
            assert not torch.allclose(model(input_ids=x).logits, exact, atol=1e-3)
        # the fit's objective picks 2 among the grid for these logits
        errors = weight_errors(sharp, sharp / 2.0, 2, TEMPERATURE_GRID)
        assert [TEMPERATURE_GRID[int(i)] for i in errors.argmin(0)] == [2.0, 2.0, 2.0]
        assert errors.min(0).values.max() < 1e-10
        pred.config.weight_temperature = [2.0, 2.0, 2.0]
        with HashRouting(model, pred, "predicted"):
            assert torch.allclose(model(input_ids=x).logits, exact, atol=1e-5)
        assert torch.equal(pred.weight_logits(sharp[1], 1), sharp[1] / 2.0)
        with pytest.raises(ValueError, match="layer must be in"):
            pred.weight_logits(sharp[1], 3)
    for bad in ([1.0, 2.0], [1.0, 0.0, 1.0]):
        with pytest.raises(ValueError, match="weight_temperature"):
            PredictorConfig(input_dim=32, num_moe_layers=3, num_experts=8, top_k=2, weight_temperature=bad)


def test_weight_temperature_is_fitted_after_training_and_saved(trace_dir, tmp_path):
    traces = load_traces(trace_dir)
    pred, report = train_predictor(traces, TrainConfig(steps=20, batch_size=8, hidden=16, fit_gate=False), progress=False)
    fit = report["temperature_fit"]
    temps = pred.config.weight_temperature
    assert temps == fit["weight_temperature"] and len(temps) == traces.manifest["num_moe_layers"]
    assert all(t in TEMPERATURE_GRID for t in temps)
    errors = torch.tensor([fit["error_by_temperature"][str(t)] for t in TEMPERATURE_GRID])  # [grid, L]
    assert [TEMPERATURE_GRID[int(i)] for i in errors.argmin(0)] == temps
    pred.save(tmp_path)
    assert HashPredictor.load(tmp_path).config.weight_temperature == temps
    again, rep = train_predictor(traces, TrainConfig(steps=2, batch_size=8, hidden=16, fit_gate=False,
                                                     fit_temperature=False), progress=False)
    assert again.config.weight_temperature == [] and "temperature_fit" not in rep
    with pytest.raises(ValueError, match="grid"):
        fit_weight_temperature(pred, traces, grid=(1.0, 0.0))


def test_hash_route_weights():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    ids, w = hash_route(logits, 2, normalize=True)
    assert ids.tolist() == [[1, 2]] and torch.allclose(w.sum(-1), torch.ones(1))
    router = torch.tensor([[3.0, 0.0, 0.0, 0.0]])
    _, w_router = hash_route(logits, 2, normalize=False, router_logits=router)
    assert torch.allclose(w_router, torch.softmax(router, -1)[:, [1, 2]])
    with pytest.raises(ValueError, match="top_k"):
        hash_route(logits, 5, True)


def test_hash_routing_checks_sizes(model):
    wrong = HashPredictor(PredictorConfig(input_dim=32, num_moe_layers=2, num_experts=8, top_k=2))
    with pytest.raises(ValueError, match="covers 2 MoE layers"):
        HashRouting(model, wrong)
    with pytest.raises(ValueError, match="weights"):
        HashRouting(model, _rigged_predictor(model, [0, 1, 2], 3), weights="mean")


# ------------------------------------------------------------------------------ cache simulation
def test_cache_simulation():
    # 2 layers, top-1, one sequence of 3 tokens; two slots
    true = torch.tensor([[[[0], [0], [1]]], [[[2], [2], [2]]]])  # [L=2, N=1, S=3, k=1]
    lru = simulate_decode(true, None, 2, "lru")
    assert (lru["acquires"], lru["hit_rate"]) == (6, pytest.approx(3 / 6))
    oracle = simulate_decode(true, true, 2, "predict_lru")
    assert oracle["hit_rate"] == 1.0 and oracle["prefetch_precision"] == 1.0
    wrong = torch.full_like(true, 3)
    assert simulate_decode(true, wrong, 2, "predict_future")["prefetch_precision"] == 0.0
    with pytest.raises(ValueError, match="needs predicted_ids"):
        simulate_decode(true, None, 2, "predict_lru")
    with pytest.raises(ValueError, match="strategy"):
        simulate_decode(true, None, 2, "mru")


# ------------------------------------------------------------------------------------------ CLI
def test_cli_trace_and_train(tmp_path, capsys):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    from sida_moe.cli import main

    model = tiny_qwen3(seed=3)
    vocab = {chr(ord("a") + i): i for i in range(26)} | {"<eos>": 26}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<eos>")
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text("the quick brown fox jumps over the lazy dog " * (3 + i))
    assert main(["trace", "--model", str(model_dir), "--corpus", str(corpus), "--out", str(tmp_path / "tr"),
                 "--seq-len", "16", "--device", "cpu", "--top-t", "4"]) == 0
    assert main(["train-predictor", "--trace", str(tmp_path / "tr"), "--held-out", str(tmp_path / "tr"),
                 "--steps", "3", "--batch-size", "2", "--device", "cpu", "--report", str(tmp_path / "r.json")]) == 0
    assert has_predictor(model_dir), "saved next to the traced model by default"
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["train_config"]["steps"] == 3 and "held_out" in report
    # the wider variant from the command line, saved elsewhere
    assert main(["train-predictor", "--trace", str(tmp_path / "tr"), "--held-out", str(tmp_path / "tr"), "--steps", "2",
                 "--batch-size", "2", "--device", "cpu", "--hidden", "16", "--head-hidden", "8",
                 "--out", str(tmp_path / "wide")]) == 0
    wide = HashPredictor.load(tmp_path / "wide")
    assert (wide.config.hidden, wide.config.head_hidden) == (16, 8)
    # the trace holds the next-layer gate: the fused correction's weights are fitted and saved
    assert len(wide.config.gate_weights) == 3 and wide.config.gate_weights[0] == 0.0
    # the deep variant; a trace without the gate gives a predictor without fused weights
    assert main(["trace", "--model", str(model_dir), "--corpus", str(corpus), "--out", str(tmp_path / "plain"),
                 "--seq-len", "16", "--device", "cpu", "--top-t", "4", "--no-next-layer-gate"]) == 0
    assert main(["train-predictor", "--trace", str(tmp_path / "plain"), "--steps", "2", "--batch-size", "2",
                 "--device", "cpu", "--hidden", "16", "--attn-blocks", "2", "--attn-heads", "4",
                 "--out", str(tmp_path / "deep")]) == 0
    deep = HashPredictor.load(tmp_path / "deep")
    assert (deep.config.attn_blocks, deep.config.attn_heads, deep.config.gate_weights) == (2, 4, [])
    # heads that do not divide the width scaled to the model (64 for its hidden size 32): refused
    capsys.readouterr()
    assert main(["train-predictor", "--trace", str(tmp_path / "plain"), "--steps", "2", "--device", "cpu",
                 "--attn-heads", "3", "--out", str(tmp_path / "odd")]) == 2
    assert "--attn-heads 3 must divide the predictor width 64 (--hidden, or scaled to the model)" in capsys.readouterr().err
    assert HashPredictor.load(model_dir).config.num_moe_layers == 3


@pytest.mark.gpu
def test_bf16_training_on_the_gpu_learns_and_reports_float32(trace_dir):
    """bf16 autocast (the forward only) trains, and the trained predictor's float32 evaluation
    beats chance on the sequences it saw."""
    traces = load_traces(trace_dir)
    cfg = TrainConfig(steps=120, batch_size=8, warmup_steps=10, lr=3e-3, target="topk", device="cuda", bf16=True)
    pred, report = train_predictor(traces, cfg, held_out=traces, progress=False)
    assert report["train_config"]["bf16"] and report["loss_last_50"] < report["loss_first"]
    assert next(pred.parameters()).dtype == torch.float32
    assert report["held_out"]["mean_recall@2"] > 0.4


def test_time_budget_is_re_estimated_after_slow_first_steps(trace_dir, monkeypatch):
    """A wall-clock budget is spent on the steady step rate, not on the first 20 (slow) steps' rate:
    with a fake clock of 1 s per step for 20 steps then 0.1 s, a 50 s budget runs 20 + 300 steps
    (the first estimate alone would have stopped at 50)."""
    import sida_moe.train.step_loop as loop_mod

    traces = load_traces(trace_dir)
    clock = {"t": 0.0, "calls": 0}

    class FakeTime:
        @staticmethod
        def perf_counter() -> float:
            return clock["t"]

    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):  # each optimizer step advances the fake clock
        clock["calls"] += 1
        clock["t"] += 1.0 if clock["calls"] <= 20 else 0.1
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(loop_mod, "time", FakeTime)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    cfg = TrainConfig(steps=10_000, batch_size=2, hidden=8, fit_gate=False, max_seconds=50.0)
    _, report = train_predictor(traces, cfg, progress=False)
    assert 310 <= report["steps_run"] <= 322
