"""The command line's answer to a user's mistake: one line on stderr naming what was wrong, exit
status 2, no traceback; Ctrl-C gives one line and 130; --version."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import sida_moe
from _moe_models import tiny_model
from sida_moe import cli


def _fails(capsys, argv, pattern):
    """``sida-moe argv`` returns 2 and prints one error line matching ``pattern`` (other libraries'
    warnings may precede it)."""
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    ours = [line for line in err.splitlines() if line.startswith("sida-moe")]
    assert len(ours) == 1, err
    assert re.search(pattern, ours[0]), ours[0]
    return ours[0]


@pytest.mark.parametrize("budget, pattern", [
    ("2", r"argument --gpu-budget: gpu_budget '2' is a number above 1 without a unit.*'2B'"),
    ("4096", r"gpu_budget '4096' is a number above 1 without a unit.*'4096B'"),
    ("-1", r"gpu_budget '-1' must be positive; use a fraction in \(0, 1\]"),
    ("1e400", r"gpu_budget '1e400' is not a finite number"),
    ("12 parsecs", r"cannot parse gpu_budget '12 parsecs'; use a fraction .* a percent .* a size with a unit"),
    ("150%", r"at most 100%"),
])
def test_bad_gpu_budget(capsys, budget, pattern):
    line = _fails(capsys, ["generate", "--gpu-budget", budget, "--max-new-tokens", "1"], pattern)
    assert line.startswith("sida-moe generate: error:")


def test_gpu_budget_one_is_all_experts(capsys):
    """``1`` is the fraction 1 (all experts), as in Python: the tiny preset's 256 experts get 256 slots."""
    assert cli.main(["generate", "--model", "qwen3-moe-tiny", "--gpu-budget", "1", "--max-new-tokens", "1",
                     "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"256 experts .* 256 slots", out), out


def test_bad_device(capsys):
    _fails(capsys, ["generate", "--device", "gpu"], r"argument --device: 'gpu' is not a device: use 'cpu', 'cuda' or 'cuda:N'")
    _fails(capsys, ["bench", "--device", "meta"], r"sida-moe bench: error: argument --device: 'meta' is not a device")
    _fails(capsys, ["trace", "--model", "m", "--corpus", "c", "--out", "o", "--device", "tpu"], r"'tpu' is not a device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_device_without_a_gpu(capsys):
    _fails(capsys, ["generate", "--device", "cuda"], r"'cuda': no CUDA device is available on this machine; use --device cpu")
    _fails(capsys, ["train-predictor", "--trace", "t", "--device", "cuda:0"], r"no CUDA device is available")


@pytest.mark.gpu
def test_cuda_device_index_beyond_the_gpus(capsys):
    _fails(capsys, ["generate", "--device", "cuda:99"], r"this machine has \d+ CUDA device\(s\)")


def test_max_new_tokens_beyond_the_context_is_refused(capsys):
    # the preset's context is 1024 tokens: refused before the model is built
    line = _fails(capsys, ["generate", "--model", "qwen3-moe-tiny", "--max-new-tokens", "5000"],
                  r"--max-new-tokens 5000 exceeds the model's context of 1024")
    assert "at most 1024" in line and capsys.readouterr().out == ""
    # with the prompt's tokens counted
    _fails(capsys, ["generate", "--model", "qwen3-moe-tiny", "--max-new-tokens", "1020", "--prompt", "0123456789"],
           r"context of 1024 tokens \(max_position_embeddings\) after a prompt of 10 tokens: at most 1014")
    _fails(capsys, ["generate", "--max-new-tokens", "0"], r"argument --max-new-tokens: must be a positive integer, got 0")


def test_max_new_tokens_of_a_checkpoint(tmp_path, capsys):
    model = tiny_model("olmoe", vocab_size=300)
    limit = model.config.max_position_embeddings
    model.save_pretrained(tmp_path)
    _fails(capsys, ["generate", "--model", str(tmp_path), "--max-new-tokens", str(limit + 1)],
           rf"exceeds the model's context of {limit} tokens")


def test_missing_and_bad_checkpoints(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(capsys, ["generate", "--model", str(empty)], rf"cannot read the checkpoint {re.escape(str(empty))}: ")
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    _fails(capsys, ["generate", "--model", str(bad_json)], rf"cannot read the checkpoint {re.escape(str(bad_json))}")
    corrupt = tmp_path / "corrupt"
    tiny_model("olmoe", vocab_size=300).save_pretrained(corrupt)
    weights = corrupt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:24] = b"x" * 16  # the header's JSON
    weights.write_bytes(bytes(data))
    _fails(capsys, ["generate", "--model", str(corrupt), "--max-new-tokens", "1"],
           rf"cannot load the checkpoint {re.escape(str(corrupt))}: .*header")
    _fails(capsys, ["bench", "--model", str(corrupt), "--device", "cpu", "--out", str(tmp_path / "b")],
           rf"sida-moe bench: error: cannot load the checkpoint {re.escape(str(corrupt))}")
    _fails(capsys, ["bench", "--model", str(tmp_path / "nowhere")], r"neither")


def test_missing_corpus_and_trace(tmp_path, capsys):
    _fails(capsys, ["trace", "--model", str(tmp_path), "--corpus", str(tmp_path / "nowhere"), "--out", str(tmp_path / "t")],
           r"sida-moe trace: error: --corpus: corpus path .*nowhere' is neither a file nor a directory")
    (tmp_path / "empty").mkdir()
    _fails(capsys, ["trace", "--model", str(tmp_path), "--corpus", str(tmp_path / "empty"), "--out", str(tmp_path / "t")],
           r"--corpus: no files ending in .* under .*empty'")
    _fails(capsys, ["train-predictor", "--trace", str(tmp_path / "nowhere")], r"--trace: .*nowhere' is not a trace directory")
    bad = tmp_path / "bad_trace"
    bad.mkdir()
    manifest = re.escape(str(bad / "manifest.json"))
    (bad / "manifest.json").write_text("{]")
    _fails(capsys, ["train-predictor", "--trace", str(bad)], rf"--trace: {manifest}: not a valid trace manifest \(invalid JSON")
    (bad / "manifest.json").write_text(json.dumps({"format": "other"}))
    _fails(capsys, ["train-predictor", "--trace", str(bad)], rf"--trace: {manifest}: trace format version None is not supported")


@pytest.mark.parametrize("args, pattern", [
    (["--steps", "-5"], r"argument --steps: must be a positive integer, got -5"),
    (["--steps", "many"], r"argument --steps: 'many' is not an integer"),
    (["--batch-size", "0"], r"argument --batch-size: must be a positive integer"),
    (["--lr", "nan"], r"argument --lr: must be a positive number, got nan"),
    (["--kd-weight", "-1"], r"argument --kd-weight: must be a number >= 0"),
    (["--dropout", "1"], r"argument --dropout: must be in \[0, 1\), got 1"),
    (["--max-seconds", "0"], r"argument --max-seconds: must be a positive number"),
    (["--lookahead-steps", "0"], r"argument --lookahead-steps: must be a positive integer"),
    (["--hidden", "64", "--attn-blocks", "2", "--attn-heads", "5"], r"--attn-heads 5 must divide --hidden 64"),
    (["--hidden", "64", "--attn-heads", "5"], r"--attn-heads 5 must divide --hidden 64"),  # the best preset's blocks
    (["--attn-blocks", "2"], r"--trace: .*nowhere' is not a trace directory"),  # a width scaled later: no early check
    # the removed variants have no flags
    (["--conditioned"], r"unrecognized arguments: --conditioned"),
    (["--prev-token-routing"], r"unrecognized arguments: --prev-token-routing"),
    (["--no-lookahead-previous-token"], r"unrecognized arguments: --no-lookahead-previous-token"),
])
def test_bad_training_arguments(tmp_path, capsys, args, pattern):
    # refused before the trace is read: this one does not exist
    _fails(capsys, ["train-predictor", "--trace", str(tmp_path / "nowhere"), *args], pattern)


@pytest.mark.parametrize("args, pattern", [
    (["--seq-len", "0"], r"argument --seq-len: must be a positive integer"),
    (["--held-out-fraction", "1.5"], r"argument --held-out-fraction: must be a number in \(0, 1\)"),
    (["--moe-inputs-every", "-1"], r"argument --moe-inputs-every: must be an integer >= 0"),
])
def test_bad_trace_arguments(tmp_path, capsys, args, pattern):
    _fails(capsys, ["trace", "--model", str(tmp_path), "--corpus", str(tmp_path), "--out", str(tmp_path / "t"), *args],
           pattern)


def test_corpus_shorter_than_one_sequence(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model_dir = tmp_path / "model"
    tiny_model("qwen3_moe").save_pretrained(model_dir)
    vocab = {chr(ord("a") + i): i for i in range(26)} | {"<eos>": 26}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<eos>").save_pretrained(model_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abc")
    _fails(capsys, ["trace", "--model", str(model_dir), "--corpus", str(corpus), "--out", str(tmp_path / "t"),
                    "--device", "cpu"], r"--corpus .*corpus.txt: corpus has \d+ tokens, fewer than one sequence of 256")


@pytest.mark.parametrize("args, pattern", [
    (["--budgets", "2"], r"argument --budgets: '2' is not a budget: use fractions in \(0, 1\] or percents"),
    (["--budgets", "10%,12GiB"], r"'12GiB' is not a budget"),
    (["--batch-sizes", "1,0"], r"argument --batch-sizes: must be a positive integer, got 0"),
    (["--new-tokens", "1"], r"argument --new-tokens: must be at least 2"),
    (["--policies", "mru"], r"sida-moe bench: error: unknown policies \['mru'\]"),
    (["--predictors", "sida"], r"the 'sida' predictor needs predictor_path"),
    (["--prompt-file", "/nonexistent/prompts.txt"], r"prompt file '/nonexistent/prompts.txt' is not a file"),
    (["--routing-trace", "/nonexistent/trace.npz"], r"/nonexistent/trace.npz: no such routing trace file"),
])
def test_bad_bench_arguments(capsys, args, pattern):
    _fails(capsys, ["bench", "--device", "cpu", *args], pattern)


def test_bench_predictor_path_without_a_predictor(tmp_path, capsys):
    _fails(capsys, ["bench", "--device", "cpu", "--predictors", "sida", "--predictor-path", str(tmp_path)],
           r"holds no trained predictor")


def test_unknown_argument_and_no_command(capsys):
    _fails(capsys, ["generate", "--bogus"], r"unrecognized arguments: --bogus")
    _fails(capsys, ["generate", "--policy", "xyz"], r"argument --policy: invalid choice: 'xyz'")


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"sida-moe {sida_moe.__version__}"


def test_keyboard_interrupt_exits_130_with_one_line(capsys):
    def run(args):
        raise KeyboardInterrupt

    cli.register_command("interrupt-test", "raises KeyboardInterrupt", lambda p: None, run)
    assert cli.main(["interrupt-test"]) == 130
    assert capsys.readouterr().err == "sida-moe interrupt-test: interrupted\n"


def test_traceback_on_request(monkeypatch):
    """``SIDA_MOE_TRACEBACK=1`` re-raises the error instead of the one line, for debugging."""
    monkeypatch.setenv("SIDA_MOE_TRACEBACK", "1")
    with pytest.raises(cli.UserError, match="neither a directory, a bundled model"):
        cli.main(["generate", "--model", "no-such-model"])


def test_program_errors_keep_their_traceback():
    """Only user mistakes are shortened: an error of the program itself still raises."""
    def run(args):
        raise RuntimeError("a bug")

    cli.register_command("bug-test", "raises RuntimeError", lambda p: None, run)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["bug-test"])


def _script(*args: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "sida_moe", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, **kwargs)


def test_the_process_prints_one_line_and_exits_2():
    proc = _script("generate", "--gpu-budget", "2")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and out == ""
    assert err.strip().splitlines()[-1].startswith("sida-moe generate: error: argument --gpu-budget:")
    assert "Traceback" not in err


def test_ctrl_c_during_generate_exits_130():
    proc = _script("generate", "--model", "qwen3-moe-tiny", "--max-new-tokens", "1000", "--device", "cpu", "--prompt", "a")
    try:
        for line in proc.stdout:  # the model is built; generation (1000 tokens) is under way
            if "built in" in line:
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "sida-moe generate: interrupted"
    assert "Traceback" not in err


def _fresh_python(*args: str, **env: str):
    """``python args...`` in a new process (so nothing this one imported counts), with ``env`` set."""
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, *args], env=dict(os.environ, **env), capture_output=True, text=True,
                          timeout=300)


def test_a_wrong_environment_setting_is_one_line_from_the_command_line():
    res = _fresh_python("-m", "sida_moe", "--max-new-tokens", "2", SIDA_MOE_KERNEL_REGIME="fast")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "SIDA_MOE_KERNEL_REGIME must be one of" in lines[0], res.stderr


def test_the_package_loads_its_names_on_first_use():
    res = _fresh_python("-c", "import sys, sida_moe; assert 'torch' not in sys.modules; "
                        "import sida_moe.offloading; assert callable(sida_moe.offload) and sida_moe.offload is "
                        "sida_moe.offloading.offload; assert set(sida_moe.__all__) <= set(dir(sida_moe)); "
                        "from sida_moe import *; assert BudgetError is sida_moe._native.BudgetError")
    assert res.returncode == 0, res.stderr


def test_help_imports_no_torch():
    """``sida-moe --help`` and each command's help build their options from plain data."""
    res = _fresh_python("-c", "import sys\nfrom sida_moe.cli import main\n"
                        "for argv in (['--help'], ['train-predictor', '--help'], ['bench', '--help'], ['generate', '--help']):\n"
                        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
                        "assert 'torch' not in sys.modules, 'torch was imported'\n")
    assert res.returncode == 0, res.stderr
    assert "train-predictor" in res.stdout and "--gpu-budget" in res.stdout
