"""``sida-moe trace`` on a checkpoint without a tokenizer, and trace directories whose files are
malformed: each gives an error naming what is wrong (and which file)."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import sida_moe
from sida_moe.cli import main
from sida_moe.train.traces import record_traces
from sida_moe.train.trace_loading import load_traces, read_manifest


def _checkpoint(path, vocab: int):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_experts=8, num_experts_per_tok=2)
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(cfg).save_pretrained(path)
    return str(path)


def _corpus(path, files: int = 10):
    path.mkdir()
    for i in range(files):
        (path / f"doc{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n")
    return str(path)


def test_trace_without_a_tokenizer_falls_back_to_bytes_and_says_so(tmp_path, capsys):
    model = _checkpoint(tmp_path / "model", vocab=300)
    corpus = _corpus(tmp_path / "corpus")
    assert main(["trace", "--model", model, "--corpus", corpus, "--out", str(tmp_path / "tr"), "--seq-len", "16",
                 "--device", "cpu", "--top-t", "4"]) == 0
    assert "ships no tokenizer: tracing the corpus as UTF-8 bytes" in capsys.readouterr().err
    text_bytes = sum(len((tmp_path / "corpus" / f"doc{i}.py").read_bytes()) + 1 for i in range(10))  # + eos each
    manifest = read_manifest(tmp_path / "tr")
    assert manifest["num_sequences"] == text_bytes // 16
    ids = load_traces(tmp_path / "tr").input_ids
    assert int(ids.min()) >= 1 and int(ids.max()) < 259  # byte tokens and eos


def test_trace_without_a_tokenizer_and_a_small_vocabulary_says_what_is_missing(tmp_path, capsys):
    model = _checkpoint(tmp_path / "model", vocab=96)
    corpus = _corpus(tmp_path / "corpus")
    capsys.readouterr()  # the checkpoint's save progress
    assert main(["trace", "--model", model, "--corpus", corpus, "--out", str(tmp_path / "tr"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"ships no tokenizer .* vocabulary of 96 tokens is too small .*needs 259", err)
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "tr").exists()


# ----------------------------------------------------------------------- malformed traces
@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    from transformers import Qwen3MoeForCausalLM

    out = tmp_path_factory.mktemp("trace")
    model = Qwen3MoeForCausalLM.from_pretrained(_checkpoint(out / "model", vocab=64)).eval()
    seqs = torch.randint(0, 64, (6, 8), generator=torch.Generator().manual_seed(0))
    record_traces(model, seqs, out / "tr", batch_size=3, top_t=4, shard_sequences=3, progress=False)
    return out / "tr"


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("edit, match", [
    (lambda m: "{not json", "invalid JSON"),
    (lambda m: json.dumps([m]), "JSON object"),
    (lambda m: json.dumps({k: v for k, v in m.items() if k != "shards"}), '"shards" must be a list'),
    (lambda m: json.dumps(m | {"shards": [{"file": "../../etc/passwd"}]}), '"shards" must be a list'),
    (lambda m: json.dumps(m | {"num_experts": "8"}), "num_experts='8'"),
    (lambda m: json.dumps(m | {"top_k": 0}), "top_k=0"),
    (lambda m: json.dumps(m | {"moe_layer_ids": [0]}), "moe_layer_ids"),
])
def test_a_malformed_manifest_names_the_file(trace_dir, tmp_path, edit, match):
    bad = _copy(trace_dir, tmp_path / "bad")
    manifest = bad / "manifest.json"
    manifest.write_text(edit(json.loads(manifest.read_text())))
    with pytest.raises(sida_moe.LoadError, match=match) as info:
        load_traces(bad)
    assert str(manifest) in str(info.value)


def test_a_missing_or_corrupt_trace_file_names_it(trace_dir, tmp_path):
    bad = _copy(trace_dir, tmp_path / "bad")
    shard = json.loads((bad / "manifest.json").read_text())["shards"][1]["file"]
    (bad / shard).write_bytes((bad / shard).read_bytes()[:-40])
    with pytest.raises(sida_moe.LoadError, match="not a valid safetensors file") as info:
        load_traces(bad)
    assert str(bad / shard) in str(info.value)
    (bad / shard).unlink()
    with pytest.raises(FileNotFoundError, match=shard):
        load_traces(bad)
    bad = _copy(trace_dir, tmp_path / "bad_embeddings")
    emb = next(f for f in bad.iterdir() if "embed" in f.name)
    save_file({"other": load_file(emb)["weight"]}, emb)
    with pytest.raises(sida_moe.LoadError, match="no 'weight' tensor") as info:
        load_traces(bad)
    assert str(emb) in str(info.value)
