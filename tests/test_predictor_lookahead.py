"""The lookahead heads (a research variant, not used by the serving prefetcher): router inputs in
traces, training, evaluation, persistence and the command line (CPU, tiny Qwen3-MoE)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from sida_moe.adapters import decoder_moe_layers
from sida_moe.predictor import HashPredictor, PredictorConfig
from sida_moe.train import (
    LookaheadConfig,
    TrainConfig,
    evaluate_lookahead,
    load_traces,
    record_traces,
    train_lookahead,
    train_predictor,
)

from _moe_models import save_with_letter_tokenizer
from test_predictor import tiny_qwen3


@pytest.fixture(scope="module")
def model():
    return tiny_qwen3(seed=4)


@pytest.fixture(scope="module")
def trace_dir(model, tmp_path_factory):
    """10 sequences in shards of 6 + 4, router inputs of every 3rd: rows 0, 3, 6, 9."""
    out = tmp_path_factory.mktemp("look-trace")
    seqs = torch.randint(0, 64, (10, 16), generator=torch.Generator().manual_seed(0))
    record_traces(model, seqs, out, batch_size=3, top_t=5, shard_sequences=4, progress=False, moe_inputs_every=3)
    return out


@pytest.fixture(scope="module")
def full_trace_dir(model, tmp_path_factory):
    """Router inputs of every sequence: training data for the heads."""
    out = tmp_path_factory.mktemp("look-full")
    seqs = torch.randint(0, 64, (48, 16), generator=torch.Generator().manual_seed(1))
    record_traces(model, seqs, out, batch_size=16, top_t=5, progress=False, moe_inputs_every=1)
    return out


def _router_inputs(model, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    seen = {}
    hooks = [l.router.register_forward_pre_hook(lambda m, a, i=l.ordinal: seen.__setitem__(i, a[0].detach()))
             for l in decoder_moe_layers(model)]
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _trained_predictor(trace, steps: int = 30) -> HashPredictor:
    pred, _ = train_predictor(trace, TrainConfig(steps=steps, batch_size=8, hidden=16, fit_gate=False), progress=False)
    return pred


def test_trace_keeps_router_inputs_of_every_nth_sequence(model, trace_dir):
    traces = load_traces(trace_dir)
    assert traces.manifest["moe_inputs_every"] == 3
    assert traces.moe_input_rows.tolist() == [0, 3, 6, 9]  # across both shards
    assert traces.moe_inputs.shape == (2, 4, 16, 32) and traces.moe_inputs.dtype == torch.float16
    seen = _router_inputs(model, traces.input_ids[[3, 9]])
    for layer in (0, 1):  # layers 0..L-2: the last layer's input predicts nothing
        expect = seen[layer].reshape(2, 16, 32)
        assert torch.allclose(traces.moe_inputs[layer, [1, 3]].float(), expect, atol=2e-3, rtol=2e-3)
    # subsets keep the inputs of the rows they keep, renumbered
    sub = traces.subset(slice(2, 8))
    assert sub.moe_input_rows.tolist() == [1, 4] and torch.equal(sub.moe_inputs, traces.moe_inputs[:, 1:3])
    picked = traces.subset(torch.tensor([9, 1, 0]))
    # kept in the trace's order, each pointing at its row of the subset
    assert picked.moe_input_rows.tolist() == [2, 0] and torch.equal(picked.moe_inputs, traces.moe_inputs[:, [0, 3]])
    only = traces.with_moe_inputs()
    assert torch.equal(only.input_ids, traces.input_ids[[0, 3, 6, 9]])
    assert torch.equal(only.topk_ids, traces.topk_ids[:, [0, 3, 6, 9]])
    assert only.moe_input_rows.tolist() == [0, 1, 2, 3]


def test_traces_without_router_inputs(model, trace_dir, tmp_path):
    seqs = load_traces(trace_dir).input_ids[:2]
    record_traces(model, seqs, tmp_path / "plain", top_t=5, progress=False)
    plain = load_traces(tmp_path / "plain")
    assert plain.moe_inputs is None and plain.manifest["moe_inputs_every"] == 0
    with pytest.raises(ValueError, match="moe-inputs-every"):
        plain.with_moe_inputs()
    with pytest.raises(ValueError, match="no router inputs"):
        train_lookahead(HashPredictor(PredictorConfig(32, 3, 8, 2, hidden=16)), plain, LookaheadConfig(steps=2))
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="moe_inputs_every"):
            record_traces(model, seqs, tmp_path / "bad", progress=False, moe_inputs_every=bad)
    # appended to a trace with inputs, the rows of the second trace are offset
    both = load_traces(trace_dir, tmp_path / "plain")
    assert both.moe_input_rows.tolist() == [0, 3, 6, 9] and both.num_sequences == 12


def test_heads_cover_every_layer_and_read_the_previous_state(full_trace_dir):
    """Untrained heads change nothing; every layer, 0 included (its state before: the embedding),
    has a head reading the previous token's state too, and one layer's path matches the batched one."""
    traces = load_traces(full_trace_dir)
    pred = _trained_predictor(traces, steps=3)
    heads = pred.add_lookahead(24)
    assert pred.config.lookahead_hidden == 24 and heads.w_in.shape == (3, 2 * 32 + 8, 24)
    embeds = traces.embeddings[traces.input_ids[:2]].float()
    with torch.no_grad():
        logits, _ = pred(embeds)
        x = traces.moe_inputs[:, :2]
        prev = torch.randn(2, 16, 32)
        for layer, state in enumerate([embeds, *x.float()]):  # zero output layer
            assert torch.equal(pred.look_ahead(logits[layer], layer, state, prev), logits[layer])
            assert torch.equal(pred.look_ahead(logits[layer], layer, state), logits[layer])
        for p in heads.parameters():
            p.normal_(0.0, 0.3)
        states = torch.cat([embeds[None], x.float()])  # the state before layers 0, 1, 2
        batched = heads(states.flatten(1, 2), logits.flatten(1, 2), prev.flatten(0, 1)).view_as(logits)
        unknown = heads(states.flatten(1, 2), logits.flatten(1, 2), None).view_as(logits)
        for layer in (0, 1, 2):
            one = pred.look_ahead(logits[layer], layer, states[layer], prev)
            assert not torch.allclose(one, logits[layer])
            assert torch.allclose(one, batched[layer], atol=1e-5)
            # unknown previous state == zeros, and it matters
            assert torch.allclose(pred.look_ahead(logits[layer], layer, states[layer]), unknown[layer], atol=1e-5)
            assert torch.allclose(pred.look_ahead(logits[layer], layer, states[layer], torch.zeros_like(prev)),
                                  unknown[layer], atol=1e-5)
            assert not torch.allclose(one, unknown[layer], atol=1e-3)
        with pytest.raises(ValueError, match="previous must be"):
            pred.look_ahead(logits[1], 1, x[0], prev[:1])


def test_token_table_previous_state_and_decode_evaluation(full_trace_dir):
    """The previous state of a training token is layer L-2's router input of the token before it in its
    sequence (zeros at a sequence's first token); evaluation reads it the same way for decode recall
    and not at all for prompt recall."""
    from sida_moe.train.lookahead import _TokenTable

    traces = load_traces(full_trace_dir)
    pred = _trained_predictor(traces, steps=3)
    table = _TokenTable([(traces, pred)], torch.device("cpu"), top_t=5)
    assert table.logits.shape == (3, 48 * 16, 8) and table.topk_ids.shape[0] == 3
    idx = torch.tensor([0, 1, 15, 16, 17, 16 * 47 + 3])
    states, previous = table.batch(idx, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(states[0], traces.embeddings[traces.input_ids.flatten()[idx].long()].half())
    assert torch.equal(states[1:], traces.moe_inputs.flatten(1, 2)[:, idx])
    last = traces.moe_inputs[-1]  # [R, S, d]
    want = torch.stack([torch.zeros(32, dtype=last.dtype), last[0, 0], last[0, 14], torch.zeros(32, dtype=last.dtype),
                        last[1, 0], last[47, 2]])
    assert torch.equal(previous, want)
    _, dropped = table.batch(torch.arange(1, 16).repeat(40), 0.5, torch.Generator().manual_seed(0))
    zeroed = (dropped.abs().sum(-1) == 0).float().mean()
    assert 0.35 < zeroed < 0.65

    heads = pred.add_lookahead(16)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0.0, 0.3)
    sub = traces.subset(slice(0, 2))
    rep = evaluate_lookahead(pred, sub, k=2)
    with torch.no_grad():
        embeds = sub.embeddings[sub.input_ids.long()].float()
        logits, _ = pred(embeds)
        shifted = torch.cat([torch.zeros_like(sub.moe_inputs[-1][:, :1]), sub.moe_inputs[-1][:, :-1]], dim=1)
        for kind, previous in (("lookahead_recall@2", shifted), ("prompt_lookahead_recall@2", None)):
            looked = pred.look_ahead(logits[0], 0, embeds, previous)
            hits = looked.topk(2, dim=-1).indices[..., :, None].eq(sub.topk_ids[0][..., None, :].long()).any(-1)
            assert rep["per_layer"][0][kind] == pytest.approx(float(hits.sum()) / (32 * 2))
    assert rep["mean_lookahead_recall@2"] != rep["mean_prompt_lookahead_recall@2"]


def test_heads_learn_from_the_layer_before(full_trace_dir):
    """On text with router inputs the heads beat the run-ahead prediction they start from (the hidden
    state of the layer before carries most of the next router's input)."""
    traces = load_traces(full_trace_dir)
    pred = _trained_predictor(traces)
    report = train_lookahead(pred, traces, LookaheadConfig(hidden=64, steps=300, batch_tokens=512, lr=3e-3),
                             held_out=traces, progress=False)
    assert report["steps_run"] == 300 and report["train_tokens"] == 48 * 16
    assert report["loss_last_50"] < report["loss_first"]
    held = report["held_out"]
    assert held["tokens"] == 48 * 16
    # layer 0 is corrected too, from the embedding and the previous state
    assert held["per_layer"][0]["lookahead_recall@2"] > held["per_layer"][0]["recall@2"] + 0.05, held
    assert held["mean_lookahead_recall@2"] > held["mean_recall@2"] + 0.05, held
    assert held["mean_prompt_lookahead_recall@2"] > held["mean_recall@2"], held
    # the network itself was not retrained
    again = evaluate_lookahead(pred, traces)
    assert again["mean_recall@2"] == pytest.approx(held["mean_recall@2"])


def test_cross_fitted_heads_see_each_parts_own_network(full_trace_dir):
    """Cross-fitting: each part's run-ahead logits in the heads' training table come from the network
    given for that part (trained without it), not from the predictor being corrected."""
    from sida_moe.train.lookahead import _TokenTable

    traces = load_traces(full_trace_dir)
    halves = [traces.subset(torch.arange(j, 48, 2)) for j in (0, 1)]
    nets = [_trained_predictor(halves[1 - j], steps=5) for j in (0, 1)]
    pred = _trained_predictor(traces, steps=5)
    table = _TokenTable(list(zip(halves, nets)), torch.device("cpu"), top_t=5)
    for j, (half, net) in enumerate(zip(halves, nets)):
        with torch.no_grad():
            want, _ = net(half.embeddings[half.input_ids.long()].float())
        got = table.logits[:, j * 24 * 16 : (j + 1) * 24 * 16]
        assert torch.allclose(got, want.flatten(1, 2), atol=1e-5)
        assert torch.equal(table.topk_ids[:, j * 24 * 16 : (j + 1) * 24 * 16], half.topk_ids.flatten(1, 2))
    with torch.no_grad():
        own, _ = pred(halves[0].embeddings[halves[0].input_ids.long()].float())
    assert not torch.allclose(table.logits[:, : 24 * 16], own.flatten(1, 2), atol=1e-3)
    report = train_lookahead(pred, halves, LookaheadConfig(hidden=16, steps=20, batch_tokens=128),
                             held_out=traces, progress=False, base=nets)
    assert report["train_tokens"] == 48 * 16 and report["logits_from"] == "2 base networks"
    assert pred.lookahead is not None and report["held_out"]["tokens"] == 48 * 16
    with pytest.raises(ValueError, match="one base network per trace part"):
        train_lookahead(pred, halves, LookaheadConfig(steps=2), base=nets[:1], progress=False)
    with pytest.raises(ValueError, match="one base network per trace part"):
        train_lookahead(pred, [], LookaheadConfig(steps=2), progress=False)
    other = HashPredictor(PredictorConfig(32, 3, 6, 2, hidden=16))
    with pytest.raises(ValueError, match=r"base\[1\] sizes do not match"):
        train_lookahead(pred, halves, LookaheadConfig(steps=2), base=[nets[0], other], progress=False)


def test_heads_are_saved_with_the_predictor(full_trace_dir, tmp_path):
    traces = load_traces(full_trace_dir)
    pred = _trained_predictor(traces, steps=3)
    train_lookahead(pred, traces, LookaheadConfig(hidden=16, steps=20, batch_tokens=128), progress=False)
    pred.save(tmp_path)
    back = HashPredictor.load(tmp_path)
    assert back.config.lookahead_hidden == 16 and back.lookahead is not None
    assert evaluate_lookahead(back, traces) == evaluate_lookahead(pred, traces)


def test_lookahead_errors(full_trace_dir):
    traces = load_traces(full_trace_dir)
    pred = HashPredictor(PredictorConfig(32, 3, 8, 2, hidden=16))
    logits = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="no lookahead heads"):
        pred.look_ahead(logits, 1, torch.zeros(4, 32))
    with pytest.raises(ValueError, match="no lookahead heads"):
        evaluate_lookahead(pred, traces)
    pred.add_lookahead(8)
    with pytest.raises(ValueError, match="moe_input must be"):
        pred.look_ahead(logits, 1, torch.zeros(4, 31))
    with pytest.raises(ValueError, match="layer must be in"):
        pred.look_ahead(logits, 3, torch.zeros(4, 32))
    for bad in (0, -2, True, 2.0):
        with pytest.raises(ValueError, match="positive int"):
            pred.add_lookahead(bad)
    with pytest.raises(ValueError, match="at least 2 MoE layers"):
        HashPredictor(PredictorConfig(32, 1, 8, 2, hidden=16)).add_lookahead(8)
    with pytest.raises(ValueError, match="lookahead_hidden"):
        PredictorConfig(32, 3, 8, 2, lookahead_hidden=-1)
    for kwargs in ({"hidden": 0}, {"steps": -1}, {"batch_tokens": 1.5}, {"lr": 0.0}, {"target": "all"},
                   {"max_seconds": 0.0}, {"kd_weight": -1.0}, {"previous_dropout": 1.0}, {"previous_dropout": -0.1}):
        with pytest.raises(ValueError):
            LookaheadConfig(**kwargs)
    other = HashPredictor(PredictorConfig(32, 3, 6, 2, hidden=16))
    with pytest.raises(ValueError, match="do not match"):
        train_lookahead(other, traces, LookaheadConfig(steps=2))


def test_cli_trains_the_heads_when_the_trace_has_router_inputs(tmp_path, capsys):
    from sida_moe.cli import main

    model_dir = save_with_letter_tokenizer(tiny_qwen3(seed=3), tmp_path / "model")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text("pack my box with five dozen liquor jugs " * (3 + i))
    common = ["--model", str(model_dir), "--corpus", str(corpus), "--seq-len", "16", "--device", "cpu", "--top-t", "4"]
    assert main(["trace", *common, "--out", str(tmp_path / "tr"), "--moe-inputs-every", "2"]) == 0
    assert json.loads((tmp_path / "tr" / "manifest.json").read_text())["moe_inputs_every"] == 2
    train = ["train-predictor", "--trace", str(tmp_path / "tr"), "--steps", "2", "--batch-size", "2", "--device", "cpu",
             "--hidden", "16"]
    assert main([*train, "--held-out", str(tmp_path / "tr"), "--lookahead-hidden", "8", "--lookahead-steps", "5",
                 "--out", str(tmp_path / "p"), "--report", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert "lookahead heads: recall@2" in printed and "prompt tokens (no previous state)" in printed
    assert "hash routing weight temperature per MoE layer" in printed
    saved = HashPredictor.load(tmp_path / "p").config
    assert saved.lookahead_hidden == 8 and len(saved.weight_temperature) == 3
    assert main([*train, "--lookahead-hidden", "8", "--lookahead-steps", "2", "--no-fit-temperature", "--dropout",
                 "0.1", "--out", str(tmp_path / "raw")]) == 0
    raw = HashPredictor.load(tmp_path / "raw").config
    assert raw.weight_temperature == [] and raw.lookahead_hidden == 8
    assert "dropout" not in json.loads((tmp_path / "raw" / "predictor.json").read_text())  # a training setting
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["lookahead"]["steps_run"] == 5 and "mean_lookahead_recall@2" in report["lookahead"]["held_out"]
    assert main([*train, "--lookahead-hidden", "0", "--out", str(tmp_path / "none")]) == 0
    assert HashPredictor.load(tmp_path / "none").lookahead is None
    capsys.readouterr()
    assert main(["trace", *common, "--out", str(tmp_path / "bad"), "--moe-inputs-every", "-1"]) == 2
    assert "argument --moe-inputs-every: must be an integer >= 0" in capsys.readouterr().err
    assert main(["train-predictor", "--trace", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert re.search("train-predictor: error: --trace: .*not a trace directory", capsys.readouterr().err)


def test_the_step_budget_follows_a_time_limit_from_the_steady_rate(monkeypatch):
    """The step loop both trainings share: the first 20 steps (slow: warm-up) do not set the
    estimate, the steady rate does; a step cap still bounds it."""
    import sida_moe.train.step_loop as loop_mod
    from sida_moe.train.step_loop import StepBudget

    clock = {"t": 0.0}
    monkeypatch.setattr(loop_mod.time, "perf_counter", lambda: clock["t"])
    budget = StepBudget(None, max_seconds=10.0)
    budget.start()
    for step in range(20):
        clock["t"] += 0.25  # 5 s of warm-up steps
        budget.update(step)
    budget.update(20)
    assert budget.total == 20 + int(5.0 / 0.25)  # the estimate from those steps alone
    for step in range(21, 31):
        clock["t"] += 0.01  # steady: 0.01 s per step
        budget.update(step)
    assert budget.total > 400 and budget.stopped_by == "max_seconds"
    capped = StepBudget(100, max_seconds=10.0)
    assert capped.total == 100 and capped.stopped_by == "steps"
    with pytest.raises(ValueError, match="step count or a time limit"):
        StepBudget(None, None)
