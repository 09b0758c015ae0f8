"""Every example runs, and `python -m fxfuse inspect` works on each."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_there_are_examples():
    assert {p.stem for p in EXAMPLES} >= {"llama_backend", "hf_model", "export_aoti", "inductor_pass"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(path):
    res = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "linear calls" in res.stdout


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_inspect_on_example(path):
    target = f"{path.relative_to(ROOT)}:build"
    res = subprocess.run([sys.executable, "-m", "fxfuse", "inspect", target], capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "removed in" in res.stdout and ("layers.0" in res.stdout or "blocks.0" in res.stdout)


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
