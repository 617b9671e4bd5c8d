"""Predictor training defaults: the best-measured variant (scaled to the model) unless ``preset="paper"``,
step and time limits that say which one stopped training, and the held-out loss of hash routing
against exact mode in the report."""

from __future__ import annotations

import json
import re
import math

import pytest
import torch

from _moe_models import save_with_letter_tokenizer
from sida_moe.train import TrainConfig, load_traces, record_traces, train_predictor
from sida_moe.predictor.model import HashPredictor
from sida_moe.predictor.config import PredictorConfig
from sida_moe.train.configs import TRAIN_PRESETS, scaled_widths
from sida_moe.train.predictor_training import hash_routing_loss
from test_predictor import tiny_qwen3


def _model(seed: int = 0):
    return tiny_qwen3(seed=seed, layers=2)


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def traces(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("trace")
    seqs = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    record_traces(model, seqs, out, batch_size=4, top_t=5, progress=False)
    return load_traces(out)


def test_scaled_widths_keep_the_measured_ratios():
    # the reference model (d=512) gets exactly the measured-best widths; others scale with d, 64..512
    assert scaled_widths(512) == (512, 256)
    assert scaled_widths(128) == (128, 64)
    assert scaled_widths(2048) == (512, 256) and scaled_widths(4096) == (512, 256)
    assert scaled_widths(100) == (128, 64) and scaled_widths(8) == (64, 32)
    with pytest.raises(ValueError, match="positive int"):
        scaled_widths(0)


def test_defaults_are_the_best_measured_variant_and_paper_is_a_preset():
    best, paper = TrainConfig(), TrainConfig.preset("paper")
    for name, value in TRAIN_PRESETS["best"].items():
        assert getattr(best, name) == value, name
    assert (best.target, best.kd_weight, best.attn_blocks, best.hidden, best.head_hidden) == ("topk", 0.5, 2, None, None)
    assert (paper.target, paper.kd_weight, paper.hidden, paper.head_hidden, paper.attn_blocks) == ("top1", 0.005, 256, 0, 0)
    assert TrainConfig.preset("paper", lr=5e-5).lr == 5e-5  # overrides on top of the preset
    with pytest.raises(ValueError, match="unknown predictor preset 'sida'; presets: best, paper"):
        TrainConfig.preset("sida")
    # explicit widths win; a width alone brings heads of half of it
    assert TrainConfig(hidden=96).widths(512) == (96, 48)
    assert TrainConfig(hidden=96, head_hidden=0).widths(512) == (96, 0)
    assert not TrainConfig().use_bf16() and not TrainConfig.preset("paper").use_bf16()  # on the CPU


def test_default_training_builds_the_scaled_deep_predictor(traces):
    pred, report = train_predictor(traces, TrainConfig(steps=2, batch_size=2, fit_gate=False), progress=False)
    c = pred.config
    assert (c.hidden, c.head_hidden, c.attn_blocks) == (*scaled_widths(traces.manifest["hidden_size"]), 2)
    assert report["train_config"]["target"] == "topk" and report["bf16"] is False
    paper, _ = train_predictor(traces, TrainConfig.preset("paper", steps=2, batch_size=2, fit_gate=False), progress=False)
    assert (paper.config.hidden, paper.config.head_hidden, paper.config.attn_blocks) == (256, 0, 0)


class _FakeClock:
    """Each optimizer step advances a fake ``time.perf_counter`` of the training loop by
    ``per_step`` seconds."""

    def __init__(self, monkeypatch, per_step: float) -> None:
        import sida_moe.train.step_loop as loop_mod

        self.t = 0.0
        clock = self

        class FakeTime:
            @staticmethod
            def perf_counter() -> float:
                return clock.t

        real_step = torch.optim.AdamW.step

        def step(opt, *args, **kwargs):
            clock.t += per_step
            return real_step(opt, *args, **kwargs)

        monkeypatch.setattr(loop_mod, "time", FakeTime)
        monkeypatch.setattr(torch.optim.AdamW, "step", step)


def test_max_seconds_alone_is_not_capped_by_a_default_step_count(traces, monkeypatch):
    """With only a time budget the steps fill it: 0.01 s per step and 1.5 s give ~150 steps, past the
    default step count (50 here; a time budget used to be capped by it), and the report says the
    time stopped it."""
    import sida_moe.train.predictor_training as train_mod

    monkeypatch.setattr(train_mod, "_DEFAULT_STEPS", 50)
    _FakeClock(monkeypatch, 0.01)
    cfg = TrainConfig(batch_size=2, hidden=8, attn_blocks=0, fit_gate=False, fit_temperature=False, max_seconds=1.5)
    _, report = train_predictor(traces, cfg, progress=False)
    assert 140 <= report["steps_run"] <= 151
    assert report["stopped_by"] == "max_seconds" and report["step_limit"] is None
    # neither limit given: the default step count
    _, report = train_predictor(traces, TrainConfig(batch_size=2, hidden=8, attn_blocks=0, fit_gate=False,
                                                    fit_temperature=False), progress=False)
    assert report["steps_run"] == 50 and report["stopped_by"] == "steps" and report["step_limit"] == 50


def test_report_says_which_limit_stopped_training(traces, monkeypatch):
    _FakeClock(monkeypatch, 0.01)
    base = dict(batch_size=2, hidden=8, attn_blocks=0, fit_gate=False, fit_temperature=False)
    # the step limit first, with time left
    _, report = train_predictor(traces, TrainConfig(steps=40, max_seconds=30.0, **base), progress=False)
    assert report["steps_run"] == 40 and report["stopped_by"] == "steps" and report["step_limit"] == 40
    # the time first, with steps left
    _, report = train_predictor(traces, TrainConfig(steps=5000, max_seconds=0.5, **base), progress=False)
    assert report["steps_run"] < 60 and report["stopped_by"] == "max_seconds"


def test_hash_routing_loss_measures_exact_and_hash_routed_loss(model, traces):
    ids = traces.input_ids[:4].long()
    pred = HashPredictor(PredictorConfig(input_dim=32, num_moe_layers=2, num_experts=8, top_k=2, hidden=16))
    rep = hash_routing_loss(model, pred, ids, batch_size=3)
    with torch.no_grad():
        want = float(model(input_ids=ids, labels=ids).loss)
    assert rep["tokens"] == ids.numel()
    assert rep["exact"]["loss"] == pytest.approx(want, rel=1e-5)
    assert rep["exact"]["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)
    for source in ("predicted", "router"):
        r = rep[source]
        # an untrained predictor picks other experts than the router: a different, measured loss
        assert r["loss"] != pytest.approx(want, rel=1e-4)
        assert r["relative_increase"] == pytest.approx(r["loss"] / want - 1.0)
    # a predictor that reproduces the router's choice exactly (router weights) gives the exact loss
    class RouterCopy(HashPredictor):
        def forward(self, embeds, state=None, attention_mask=None):
            return torch.stack(captured), state

    captured: list[torch.Tensor] = []
    from sida_moe.adapters import decoder_moe_layers

    hooks = [layer.router.register_forward_hook(
        lambda m, a, out: captured.append((out[0] if isinstance(out, tuple) else out).detach().reshape(1, *ids.shape, -1)[0]))
        for layer in decoder_moe_layers(model)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    copy = RouterCopy(pred.config)
    same = hash_routing_loss(model, copy, ids, weights=("router",), batch_size=len(ids))
    assert same["router"]["loss"] == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="input_ids must be"):
        hash_routing_loss(model, pred, ids[:, :1])


def test_train_report_and_cli_give_hash_routing_loss(model, traces, tmp_path, capsys):
    pred, report = train_predictor(traces, TrainConfig(steps=3, batch_size=2, hidden=16, fit_gate=False), held_out=traces,
                                   model=model, progress=False)
    hr = report["hash_routing"]
    assert hr["tokens"] == traces.input_ids.numel() and hr["exact"]["loss"] > 0
    assert set(hr) == {"tokens", "exact", "predicted", "router"}
    # no model: no measurement
    _, report = train_predictor(traces, TrainConfig(steps=1, batch_size=2, hidden=16, fit_gate=False), held_out=traces,
                                progress=False)
    assert "hash_routing" not in report


def test_train_predictor_cli_reports_limits_presets_and_hash_routing(tmp_path, capsys):
    from sida_moe.cli import main

    model_dir = save_with_letter_tokenizer(_model(seed=3), tmp_path / "model")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text("the quick brown fox jumps over the lazy dog " * (3 + i))
    assert main(["trace", "--model", str(model_dir), "--corpus", str(corpus), "--out", str(tmp_path / "tr"),
                 "--seq-len", "16", "--device", "cpu", "--top-t", "4"]) == 0
    capsys.readouterr()
    args = ["train-predictor", "--trace", str(tmp_path / "tr"), "--held-out", str(tmp_path / "tr"), "--batch-size", "2",
            "--device", "cpu"]
    assert main([*args, "--steps", "3", "--max-seconds", "600", "--out", str(tmp_path / "best"),
                 "--report", str(tmp_path / "best.json")]) == 0
    out = capsys.readouterr().out
    assert "training stopped at its step limit, 3 steps" in out and "600 s --max-seconds allowed" in out
    assert "held-out loss" in out and "exact mode" in out and "hash routing (predictor's experts and weights)" in out
    report = json.loads((tmp_path / "best.json").read_text())
    assert report["stopped_by"] == "steps" and report["hash_routing"]["exact"]["loss"] > 0
    best = HashPredictor.load(tmp_path / "best")
    assert (best.config.hidden, best.config.head_hidden, best.config.attn_blocks) == (64, 32, 2)  # d=32 -> 64 / 32
    assert main([*args, "--steps", "2", "--preset", "paper", "--no-hash-routing-eval", "--out", str(tmp_path / "paper"),
                 "--report", str(tmp_path / "paper.json")]) == 0
    out = capsys.readouterr().out
    assert "exact mode" not in out and "held-out loss" not in out  # --no-hash-routing-eval
    assert "training stopped at its step limit, 2 steps" in out
    paper = HashPredictor.load(tmp_path / "paper")
    assert (paper.config.hidden, paper.config.head_hidden, paper.config.attn_blocks) == (256, 0, 0)
    assert json.loads((tmp_path / "paper.json").read_text())["train_config"]["target"] == "top1"
    # a flag overrides the preset's setting
    assert main([*args, "--steps", "2", "--preset", "paper", "--target", "topk", "--no-hash-routing-eval",
                 "--out", str(tmp_path / "mixed"), "--report", str(tmp_path / "mixed.json")]) == 0
    assert json.loads((tmp_path / "mixed.json").read_text())["train_config"]["target"] == "topk"
    capsys.readouterr()
    assert main([*args, "--steps", "1", "--hidden", "24", "--attn-heads", "5", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search("train-predictor: error: --attn-heads 5 must divide --hidden 24", err), err
