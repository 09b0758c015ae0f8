"""Every example runs, and `python -m fxfuse inspect` works on each.

Both run in this process, as the command line would run them (runpy with
__name__ == "__main__" and the script's argv; fxfuse.cli.main with the same
arguments, from the repository root): a fresh interpreter per example cost
about 5 s of imports and compiler start-up each, 16 times. tests/test_observe.py
runs `python -m fxfuse inspect` in a subprocess, as a user would.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from fxfuse.cli import main as fxfuse_cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_there_are_examples():
    assert {p.stem for p in EXAMPLES} >= {"llama_backend", "hf_model", "export_aoti", "inductor_pass"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(path, monkeypatch, capsys):
    # As `python path` from the repository root: its own argv (not pytest's),
    # its directory first on sys.path. An exception (a failed assert_close, any
    # sys.exit) fails the test, as a nonzero exit status did.
    monkeypatch.setattr(sys, "argv", [str(path)])
    monkeypatch.syspath_prepend(str(path.parent))
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(path), run_name="__main__")
    assert "linear calls" in capsys.readouterr().out


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_inspect_on_example(path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    target = f"{path.relative_to(ROOT)}:build"
    assert fxfuse_cli(["inspect", target]) == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr().out
    assert "removed in" in out and ("layers.0" in out or "blocks.0" in out)


def test_plot_ratios_reads_the_table_a_benchmark_log_ends_with():
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("plot_ratios", root / "benchmarks" / "plot_ratios.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    col, rows = mod.read_table(root / "docs" / "results" / "h200_unet_step_reduce_overhead.log")
    assert col == "vs inductor"
    assert rows == [("inductor", 1.0), ("fxfuse", 1.053), ("fxfuse_all", 1.053), ("diffusers", 1.024)]
    col, rows = mod.read_table(root / "docs" / "results" / "h200_llama_batch_8l_no_grad.log")
    assert col == "fxfuse vs unfused" and [r[0] for r in rows][:2] == ["prefill 512", "prefill 2048"]
    assert dict(rows)["decode batch 1"] == 1.075
