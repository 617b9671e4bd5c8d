"""The trained checkpoint shipped inside the package (``sida_moe.presets.BUNDLED_MODELS``): the model of
a no-argument ``sida-moe generate``, with trained routing that its SiDA predictor predicts."""

from __future__ import annotations

import inspect
import json
import math
import os
import re

import pytest
import torch

from _moe_models import eager_experts
import sida_moe
from sida_moe import cli
from sida_moe.predictor import HashPredictor, load_prefetcher
from sida_moe.presets import BUNDLED_MODELS, DEFAULT_MODEL, bundled_model_path

PATH = bundled_model_path()

# Python the model has not seen (written for this test), for teacher-forced decoding
SOURCE = '''import os
import sys


class Registry:
    """Keep named handlers and call them in the order they were added."""

    def __init__(self, name, parent=None):
        self.name = name
        self.parent = parent
        self._handlers = {}

    def register(self, key, handler):
        if not callable(handler):
            raise TypeError("handler must be callable, not %r" % (handler,))
        if key in self._handlers:
            raise KeyError(key)
        self._handlers[key] = handler
        return handler

    def get(self, key, default=None):
        try:
            return self._handlers[key]
        except KeyError:
            if self.parent is not None:
                return self.parent.get(key, default)
            return default

    def __len__(self):
        return len(self._handlers)

    def __repr__(self):
        return "<%s %s with %d handlers>" % (self.__class__.__name__, self.name, len(self))


def load_paths(directory):
    result = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path) and name.endswith(".py"):
            result.append(path)
    return result
'''


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread while this module runs: with two OpenMP threads beside the copy workers on
    a 2-core machine, a decode step with demand loads took 1.3 s instead of 22 ms."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(PATH)


@pytest.fixture(scope="module")
def original():
    from transformers import AutoModelForCausalLM

    # transformers' eager experts loop: the op-by-op twin of the reference kernels, so bf16 tokens
    # compare exactly (its grouped_mm path rounds in another order)
    return eager_experts(AutoModelForCausalLM.from_pretrained(PATH)).eval()


@pytest.fixture(scope="module")
def source_ids(tokenizer):
    return torch.tensor([tokenizer(SOURCE)["input_ids"]])


def _offloaded(policy: str, prefetch, budget="25%"):
    if prefetch == "sida":
        # each decode token is predicted in begin_forward, before its layers run
        prefetch = load_prefetcher(PATH)
    return sida_moe.from_pretrained(PATH, budget, device="cpu", policy=policy, prefetch=prefetch, progress=False)


def _teacher_forced_stats(model, ids: torch.Tensor, prefill: int = 8) -> dict:
    """Decode ``ids`` one token at a time after a ``prefill``-token prompt; the engine's stats of the
    decode steps only."""
    engine = sida_moe.engine_of(model)
    # transformers renamed past_key_values to cache (5.2x)
    name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    with torch.inference_mode():
        cache = model(input_ids=ids[:, :prefill], use_cache=True)[name]
        engine.reset_stats()
        for t in range(prefill, ids.shape[1]):
            cache = model(input_ids=ids[:, t : t + 1], use_cache=True, **{name: cache})[name]
    stats = engine.stats()
    engine.close()
    return stats


def test_bundled_files_size_and_license_notes():
    assert DEFAULT_MODEL in BUNDLED_MODELS and os.path.isdir(PATH)
    files = set(os.listdir(PATH))
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "predictor.json",
                 "predictor.safetensors", "NOTICE.md", "LICENSE-PSF.txt", "training.json"):
        assert name in files, name
    assert sum(os.path.getsize(os.path.join(PATH, f)) for f in files) < 8.5e6  # small enough to ship
    notice = open(os.path.join(PATH, "NOTICE.md")).read()
    assert "Python" in notice and "PSF License" in notice and "standard library" in notice
    assert "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in open(os.path.join(PATH, "LICENSE-PSF.txt")).read()
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(PATH)
    assert (config.model_type, config.num_hidden_layers, config.num_experts, config.num_experts_per_tok) == \
        ("qwen3_moe", 4, 16, 4)
    pred = HashPredictor.load(PATH)
    assert (pred.config.num_moe_layers, pred.config.num_experts, pred.config.input_dim) == (4, 16, config.hidden_size)
    training = json.load(open(os.path.join(PATH, "training.json")))
    assert "site-packages" in training["corpus"]["excluded_dirs"] and training["corpus"]["train_files"] > 100
    with pytest.raises(ValueError, match="unknown bundled model 'nope'; bundled models: qwen3-moe-stdlib"):
        bundled_model_path("nope")


def test_bundled_model_has_learned_python(tokenizer, original, source_ids):
    vocab = len(tokenizer)
    assert 2000 <= vocab <= 4200
    with torch.no_grad():
        loss = float(original(input_ids=source_ids, labels=source_ids).loss)
    # unseen Python: far below a model that knows nothing (ln V, 8.3 nats for 4096 tokens)
    assert loss < 0.6 * math.log(vocab), loss
    prompt = tokenizer("def parse_args(argv):\n    ", return_tensors="pt")
    with torch.no_grad():
        out = original.generate(**prompt, max_new_tokens=40, do_sample=False)
    text = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])
    assert "\ufffd" not in text and all(c.isprintable() or c in "\n\t" for c in text), text
    words = set(re.findall(r"[A-Za-z_]+", text))
    assert len(words & {"self", "return", "if", "for", "in", "not", "None", "def", "is", "raise", "args", "argv"}) >= 2, text


def test_offloaded_bundled_model_gives_the_original_tokens(tokenizer, original):
    prompt = tokenizer("class Cache:\n    def __init__(self", return_tensors="pt")
    with torch.no_grad():
        want = original.generate(**prompt, max_new_tokens=24, do_sample=False)
    for policy, prefetch in (("lru", "none"), ("predictive", "sida")):
        model = _offloaded(policy, prefetch)
        with torch.inference_mode():
            got = model.generate(**prompt, max_new_tokens=24, do_sample=False)
        sida_moe.engine_of(model).close()
        assert torch.equal(got, want), (policy, prefetch)


def test_sida_prefetch_raises_the_hit_rate(source_ids):
    """Teacher-forced decode of unseen Python at a 25% budget (16 slots, one token's worth of experts):
    the trained predictor's experts, prefetched before each token's layers, raise the hit rate over
    demand loading, and with the predictive policy (fed the same predictions) by far."""
    plain = _teacher_forced_stats(_offloaded("lru", "none"), source_ids)
    lru_sida = _teacher_forced_stats(_offloaded("lru", "sida"), source_ids)
    best = _teacher_forced_stats(_offloaded("predictive", "sida"), source_ids)
    # every decode token's prediction was scored against its routing (4 MoE layers, top-4)
    decode_tokens = source_ids.shape[1] - 8
    assert lru_sida["prefetch_scored_experts"] == best["prefetch_scored_experts"] == decode_tokens * 4 * 4
    # the predictor's recall on unseen text is far above chance (4 of 16 experts: 0.25)
    assert lru_sida["prefetch_hit_rate"] > 0.6 and best["prefetch_hit_rate"] > 0.6
    assert lru_sida["hit_rate"] > plain["hit_rate"] + 0.05, (plain["hit_rate"], lru_sida["hit_rate"])
    assert best["hit_rate"] > plain["hit_rate"] + 0.2, (plain["hit_rate"], best["hit_rate"])
    print(f"hit rate at 25%: lru {plain['hit_rate']:.3f}, lru + sida {lru_sida['hit_rate']:.3f}, predictive + sida "
          f"{best['hit_rate']:.3f}; predictor recall {lru_sida['prefetch_hit_rate']:.3f}")


def test_no_argument_generate_uses_the_bundled_model_and_its_predictor(capsys):
    assert cli.main(["generate", "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {PATH}" in out and "policy predictive, prefetch sida" in out
    assert "def read_config(path):" in out and "\ufffd" not in out
    hit = float(re.search(r"expert hit rate: ([0-9.]+)", out).group(1))
    recall = float(re.search(r"SiDA predictor recall ([0-9.]+)", out).group(1))
    assert recall > 0.6 and hit > 0.6, out


def test_prefetch_sida_works_out_of_the_box(capsys):
    assert cli.main(["generate", "--prefetch", "sida", "--policy", "lru", "--max-new-tokens", "4",
                     "--prompt", "import os\n"]) == 0
    out = capsys.readouterr().out
    assert "policy lru, prefetch sida" in out and "SiDA predictor recall" in out
    # the random-weight presets stay selectable by name; they have no predictor
    assert cli.main(["generate", "--model", "qwen3-moe-tiny", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "preset qwen3-moe-tiny (random weights)" in out and "prefetch next_layer_gate" in out
