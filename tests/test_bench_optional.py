"""``sida-moe bench`` on a normal install: the default baselines run (accelerate is declared in the
``bench`` extra), a part that is not installed is skipped with one note before the first row, and a
single budget is drawn as bars."""

import json
import sys


from sida_moe import cli
from sida_moe.bench.report import budget_figure
from sida_moe.bench.config import BASELINES, BenchConfig, optional_parts
from sida_moe.bench.runner import run_bench

_SMALL = ["--device", "cpu", "--budgets", "50%", "--policies", "lru", "--predictors", "none", "--prompt-tokens", "6",
          "--new-tokens", "3", "--accelerate-new-tokens", "2"]


_CPU_NOTE = "skipping the resident_graphed baseline: CUDA graphs need a CUDA device"


def test_default_baselines_run_on_the_cpu(tmp_path, capsys):
    """Every default baseline that a CPU runs, accelerate's CPU offload included, gives a row (the
    graphed resident one is skipped with a note); the plots are written."""
    assert cli.main(["bench", *_SMALL, "--rounds", "2", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    rows = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert {r["system"] for r in rows} == {"sida", *BASELINES} - {"resident_graphed"}
    assert [line for line in err.splitlines() if "note:" in line] == [f"sida-moe bench: note: {_CPU_NOTE}"]
    assert "(bench.json, bench.md, plots)" in out
    assert all(r["rounds"] == (1 if r["system"] == "accelerate_cpu" else 2) for r in rows)
    assert (tmp_path / "tokens_per_s_vs_budget.png").stat().st_size > 1000


def test_missing_optional_parts_are_skipped_with_one_note(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    cfg = BenchConfig(model="qwen3-moe-tiny", device="cpu", budgets=(0.5,), policies=("lru",), predictors=("none",),
                      prompt_tokens=6, new_tokens=3, accelerate_new_tokens=2, out_dir=str(tmp_path), progress=False)
    baselines, plots, note = optional_parts(cfg)
    assert "accelerate_cpu" not in baselines and not plots
    assert set(baselines) == set(BASELINES) - {"accelerate_cpu", "resident_graphed"}
    assert note.startswith("skipping the accelerate_cpu baseline and the plots") and note.endswith(f"; {_CPU_NOTE}")
    assert "accelerate and matplotlib are not installed" in note and '".[bench]"' in note
    rows = run_bench(cfg)
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "note:" in line]
    assert notes == [f"sida-moe bench: note: {note}"]
    assert {r["system"] for r in rows} == {"sida", "resident", "ondemand_lru", "sida_sync"}
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["meta"]["skipped"] == note and len(saved["results"]) == len(rows)
    assert (tmp_path / "bench.md").read_text().count("| sida |") == 1
    assert not list(tmp_path.glob("*.png"))


def test_cli_says_no_plots_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["bench", *_SMALL, "--baselines", "resident", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "sida-moe bench: note: skipping the plots (bench.json and bench.md are still written): matplotlib is not installed" in err
    assert "(bench.json, bench.md; no plots)" in out and "Traceback" not in err
    assert (tmp_path / "bench.md").exists() and not list(tmp_path.glob("*.png"))


def test_nothing_to_note_without_an_output_directory(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    cfg = BenchConfig(baselines=("resident",), out_dir=None)
    assert optional_parts(cfg) == (("resident",), False, None)


def _rows(budgets):
    rows = [{"system": "resident", "policy": "-", "predictor": "-", "budget_fraction": None, "decode_tokens_per_s": 50.0}]
    for pol in ("lru", "predictive"):
        for b in budgets:
            rows.append({"system": "sida", "policy": pol, "predictor": "none", "budget_fraction": b,
                         "decode_tokens_per_s": 10 + 40 * b})
    return rows


def test_a_single_budget_is_drawn_as_bars():
    import matplotlib.pyplot as plt

    fig = budget_figure(_rows([0.25]), "decode_tokens_per_s", "decode tokens/s")
    ax = fig.axes[0]
    assert len(ax.patches) == 3 and not ax.lines  # one bar per system, no points or reference lines
    assert [p.get_height() for p in ax.patches] == [20.0, 20.0, 50.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["sida lru/none", "sida predictive/none", "resident"]
    assert "25%" in ax.get_title()
    plt.close(fig)


def test_several_budgets_are_drawn_as_lines():
    import matplotlib.pyplot as plt

    fig = budget_figure(_rows([0.1, 0.25, 0.5]), "decode_tokens_per_s", "decode tokens/s")
    ax = fig.axes[0]
    assert not ax.patches
    lines = [line for line in ax.lines if len(line.get_xdata()) == 3]
    assert len(lines) == 2 and list(lines[0].get_xdata()) == [10, 25, 50]
    assert len(ax.lines) == 3  # the resident model as a horizontal line
    plt.close(fig)
    assert budget_figure(_rows([0.5]), "missing_metric", "x") is None
