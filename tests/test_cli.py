"""The sida-moe CLI: generate with a preset or a checkpoint prints the promised figures; commands
register through register_command."""

import argparse
import re

import pytest

from _moe_models import tiny_model
from sida_moe import cli
from sida_moe.presets import PRESETS, get_preset
from sida_moe.byte_tokenizer import ByteTokenizer


def test_generate_random_weight_preset(capsys):
    assert cli.main(["generate", "--model", "qwen3-moe-tiny", "--max-new-tokens", "4", "--gpu-budget", "25%"]) == 0
    out = capsys.readouterr().out
    assert "preset qwen3-moe-tiny" in out
    for figure in ("tokens/s:", "expert hit rate:", "bytes moved per token:", "all-resident"):
        assert figure in out


def test_no_subcommand_means_generate(capsys):
    assert cli.main(["--model", "switch-base-8-tiny", "--max-new-tokens", "2", "--prompt", "a", "--prompt", "bc"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- ") == 2 and "switch-base-8-tiny" in out


def test_generate_from_checkpoint(tmp_path, capsys):
    tiny_model("olmoe", vocab_size=300).save_pretrained(tmp_path)  # the byte tokenizer needs 259 ids
    assert cli.main(["generate", "--model", str(tmp_path), "--max-new-tokens", "3", "--gpu-budget", "0.5",
                     "--prefetch", "none", "--policy", "lfu"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {tmp_path}" in out and "policy lfu, prefetch none" in out


def test_checkpoint_vocab_too_small_for_bytes(tmp_path, capsys):
    tiny_model("olmoe").save_pretrained(tmp_path)
    assert cli.main(["generate", "--model", str(tmp_path), "--max-new-tokens", "1"]) == 2
    assert re.search("vocabulary of 96 tokens.*259", capsys.readouterr().err)


def test_unknown_model(capsys):
    assert cli.main(["generate", "--model", "no-such-model", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "neither a directory" in err and "qwen3-moe-stdlib" in err and "qwen3-moe-tiny" in err


def test_budget_too_small_is_reported(capsys):
    assert cli.main(["generate", "--gpu-budget", "1KiB", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(r"error: gpu_budget of 1.00 KiB .*minimum budget is \d+ bytes \('\d+B'", err)


def test_register_command(capsys):
    seen = {}

    def configure(p: argparse.ArgumentParser) -> None:
        p.add_argument("--n", type=int, default=1)

    def run(args: argparse.Namespace) -> int:
        seen["n"] = args.n
        return 7

    cli.register_command("echo-test", "test command", configure, run)
    assert cli.main(["echo-test", "--n", "3"]) == 7 and seen == {"n": 3}
    with pytest.raises(ValueError, match="already registered"):
        cli.register_command("echo-test", "again", configure, lambda a: 0)


def test_presets_and_tokenizer():
    with pytest.raises(ValueError, match="unknown preset 'gpt-5'; built-in presets: qwen3-moe-tiny"):
        get_preset("gpt-5")
    assert get_preset("qwen3-30b-a3b").config["num_experts"] == 128 and "qwen3-moe-tiny" in PRESETS
    tok = ByteTokenizer()
    batch = tok(["héllo", "a"])
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 6)
    assert batch["attention_mask"][1].tolist() == [0, 0, 0, 0, 0, 1]
    assert tok.decode(batch["input_ids"][0].tolist()) == "héllo"
