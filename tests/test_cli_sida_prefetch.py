"""``sida-moe generate --prefetch sida`` loads the predictor saved beside a checkpoint."""

import pytest
import torch

from sida_moe.cli import main
from sida_moe.predictor.model import HashPredictor
from sida_moe.predictor.config import PredictorConfig


def _checkpoint(tmp_path, with_predictor: bool):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=300, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_experts=8, num_experts_per_tok=2)
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(cfg).save_pretrained(tmp_path)
    if with_predictor:
        HashPredictor(PredictorConfig(input_dim=32, num_moe_layers=2, num_experts=8, top_k=2, hidden=16)).save(tmp_path)
    return str(tmp_path)


def test_generate_with_the_saved_predictor(tmp_path, capsys):
    path = _checkpoint(tmp_path, with_predictor=True)
    rc = main(["generate", "--model", path, "--prefetch", "sida", "--gpu-budget", "50%", "--max-new-tokens", "4",
               "--device", "cpu", "--prompt", "def f(x):"])
    assert rc == 0
    assert "hit rate" in capsys.readouterr().out


def test_generate_without_a_predictor_says_what_is_missing(tmp_path, capsys):
    path = _checkpoint(tmp_path, with_predictor=False)
    assert main(["generate", "--model", path, "--prefetch", "sida", "--max-new-tokens", "2", "--device", "cpu"]) == 2
    assert "holding a trained predictor" in capsys.readouterr().err
