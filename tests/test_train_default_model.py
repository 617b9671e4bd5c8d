"""``benches/train_default_model.py`` (the bundled model's recipe) runs on the CPU end to end: a few
steps on a few standard-library files give a checkpoint that ``sida-moe generate`` serves with its
predictor, license notes and a training record."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benches", "train_default_model.py")


@pytest.mark.slow
def test_recipe_runs_on_the_cpu_and_its_output_is_served(tmp_path, capsys):
    out = tmp_path / "model"
    args = [sys.executable, SCRIPT, "--out", str(out), "--device", "cpu", "--max-files", "4", "--vocab-size", "300",
            "--seq-len", "32", "--batch-size", "2", "--steps", "2", "--predictor-steps", "2", "--lookahead-steps", "2",
            "--hidden", "64", "--experts", "8", "--top-k", "2"]
    run = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "predictor.json", "predictor.safetensors",
                 "NOTICE.md", "training.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "training.json").read_text())
    assert summary["model"]["steps"] == 2 and summary["predictor"]["train"]["steps_run"] == 2
    assert summary["predictor"]["train"]["stopped_by"] == "steps"
    assert summary["predictor"]["stored_dtype"] == "float16"
    assert set(summary["hash_routing"]) == {"tokens", "exact", "predicted", "router"}
    assert "PSF License" in (out / "NOTICE.md").read_text()
    from sida_moe import cli

    capsys.readouterr()
    assert cli.main(["generate", "--model", str(out), "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert "policy predictive, prefetch sida" in capsys.readouterr().out
