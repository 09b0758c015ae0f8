"""What fxfuse shows: TORCH_LOGS, TORCH_TRACE artifacts, the inspect command."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import gc, torch, fxfuse
from fxfuse.models import LlamaConfig, Transformer
m = Transformer(LlamaConfig(n_layer=2)).eval()
with torch.no_grad():
    torch.compile(m, backend=fxfuse.backend(inner="eager"))(torch.randint(0, 128, (1, 4)))
gc.freeze()  # speed only: no collection of the whole heap at exit (~1.3 s a process)
"""


def run(args, env_extra=None, cwd=ROOT):
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_LOGS", "TORCH_TRACE")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.fixture
def cli(monkeypatch, capsys):
    """`python -m fxfuse ARGS` run in this process (fxfuse.cli.main, from the
    repository root, which `-m` puts first on sys.path), for the tests that read
    only its exit status and stdout: a fresh interpreter cost ~4 s each. What
    reaches stderr (one line, no traceback) is checked on the real command, in
    a subprocess (`run`)."""
    from fxfuse.cli import main

    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))

    def run_here(args):
        capsys.readouterr()  # only this command's output
        try:
            code = main(args)
        except SystemExit as e:  # argparse's --help
            code = e.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(["python", "-m", "fxfuse", *args], code, out.out, out.err)

    return run_here


def fxfuse_lines(text):
    return [line for line in text.splitlines() if "fxfuse" in line and "Warning" not in line]


def test_logs_silent_by_default():
    res = run(["-c", SCRIPT])
    assert res.returncode == 0, res.stderr
    assert fxfuse_lines(res.stdout + res.stderr) == []


def test_logs_info_summary():
    res = run(["-c", SCRIPT], {"TORCH_LOGS": "fxfuse"})
    assert res.returncode == 0, res.stderr
    (line,) = fxfuse_lines(res.stderr)
    assert "fxfuse: 15 -> 9 linear calls (6 removed in 4 groups" in line
    assert ": layers.0.attention.{wq, wk, wv}; layers.0.feed_forward.{w1, w3}; " in line
    assert len(line) < 300


def test_logs_info_says_why_gradients_block_fusion():
    # An .eval() model called without no_grad: its weights need gradients.
    script = SCRIPT.replace("with torch.no_grad():\n    ", "")
    res = run(["-c", script], {"TORCH_LOGS": "fxfuse"})
    assert res.returncode == 0, res.stderr
    summary, hint = fxfuse_lines(res.stderr)
    assert "fxfuse: 15 -> 15 linear calls (0 removed" in summary
    assert "10 linear calls left alone because their weights need gradients (weights_need_grad): " \
        "run the model under torch.no_grad() or torch.inference_mode()" in hint


def test_logs_debug_diff():
    res = run(["-c", SCRIPT], {"TORCH_LOGS": "+fxfuse"})
    assert res.returncode == 0, res.stderr
    text = res.stderr
    assert "===== fxfuse: graph after the rewrite =====" in text
    diff = text.split("===== fxfuse: diff =====", 1)[1]
    # Strip the log prefix: "V1126 12:10:09.478000 11048 path.py:55] [0/0] ".
    body = [re.sub(r"^\S+ \S+ \d+ \S+\] (\[[^\]]*\] )?", "", line) for line in diff.splitlines()]
    removed = [b for b in body if b.startswith("-") and "torch._C._nn.linear(" in b]
    added = [b for b in body if b.startswith("+") and "torch._C._nn.linear(" in b]
    splits = [b for b in body if b.startswith("+") and "split(" in b]
    # q, k, v and w1, w3 of both layers go; one GEMM per group comes in, with its split.
    assert len(removed) == 10 and len(added) == 4 and len(splits) == 4


@pytest.mark.parametrize("setting", ["fxfuse", "+fxfuse"])
def test_torch_logs_setting_does_not_break_import_torch(setting):
    res = run(["-c", "import torch; print('ok')"], {"TORCH_LOGS": setting})
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_torch_trace_artifacts(tmp_path):
    res = run(["-c", SCRIPT], {"TORCH_TRACE": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    lines = [line for f in tmp_path.iterdir() for line in f.read_text().splitlines()]
    names = [json.loads(line.split("] ", 1)[1]).get("artifact", {}).get("name")
             for line in lines if '{"artifact"' in line]
    assert "fxfuse_report" in names and "fxfuse_graph" in names
    i = next(i for i, line in enumerate(lines) if "fxfuse_report" in line)
    payload = json.loads(lines[i + 1].strip())
    assert payload["removed"] == 6 and payload["before"] == 15


def test_inspect_example(cli):
    res = cli(["inspect", "examples/llama_backend.py:build", "--diff"])
    assert res.returncode == 0, res.stderr
    assert "fxfuse: 15 -> 9 linear calls" in res.stdout
    assert "layers.0.attention.wq, layers.0.attention.wk, layers.0.attention.wv" in res.stdout
    assert "+++ graph 0 after fxfuse" in res.stdout


def test_inspect_with_input_shape(cli):
    res = cli(["inspect", "tests.test_observe:siblings", "--input-shape", "2,8"])
    assert res.returncode == 0, res.stderr
    assert "fxfuse: 3 -> 1 linear calls (2 removed in 1 groups" in res.stdout


@pytest.mark.parametrize("target, message", [
    ("nosuch_module:build", "cannot import 'nosuch_module'"),
    ("examples/llama_backend.py:nosuch", "has no callable 'nosuch'"),
    ("no_colon", "MODULE:FACTORY"),
    ("torch.nn:Linear", "torch.nn:Linear() raised TypeError"),
])
def test_inspect_bad_target_is_one_line(target, message):
    res = run(["-m", "fxfuse", "inspect", target])
    assert res.returncode == 2
    (line,) = res.stderr.strip().splitlines()
    assert message in line and "Traceback" not in res.stderr


def test_help_lists_every_command(cli):
    res = cli(["--help"])
    assert res.returncode == 0 and "demo" in res.stdout and "inspect" in res.stdout
    res = cli(["inspect", "--help"])
    assert "--input-shape" in res.stdout and "--diff" in res.stdout


def siblings():
    import torch

    class QKV(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (torch.nn.Linear(8, 8) for _ in range(3))

        def forward(self, x):
            return self.q(x) + self.k(x) * self.v(x)

    return QKV()


def float_tokens():
    import torch
    from fxfuse.models import LlamaConfig, Transformer

    return Transformer(LlamaConfig(n_layer=1)), (torch.randn(1, 8),)


def keyword_inputs():
    import torch
    from fxfuse.models import LlamaConfig, Transformer

    return Transformer(LlamaConfig(n_layer=1)), {"tokens": torch.zeros(1, 8, dtype=torch.long)}


def test_inspect_keeps_the_cause_of_a_tracing_error():
    res = run(["-m", "fxfuse", "inspect", "tests.test_observe:float_tokens"])
    assert res.returncode == 2
    (line,) = res.stderr.strip().splitlines()
    assert "Expected tensor for argument #1 'indices' to have one of the following scalar types" in line
    assert "(models.py:" in line  # where, in the user's code


def test_inspect_keyword_inputs_show_the_backends_weights_mode(cli):
    res = cli(["inspect", "tests.test_observe:keyword_inputs", "--diff"])
    assert res.returncode == 0, res.stderr
    assert "fxfuse: 8 -> 5 linear calls (3 removed in 2 groups" in res.stdout
    rows = [line for line in res.stdout.splitlines() if "layers.0." in line]
    assert len(rows) == 2 and all(" storage " in r for r in rows)  # one storage, as the backend keeps it
    added = [line for line in res.stdout.splitlines() if line.startswith("+ ")]
    assert any("fxfuse_fused_0" in line for line in added) and not any("torch.cat(" in line for line in added)


def test_tlparse_lists_fxfuse_artifacts(tmp_path):
    tlparse = shutil.which("tlparse") or shutil.which("tlparse", path=str(Path(sys.executable).parent))
    if tlparse is None:
        pytest.skip("tlparse is not installed")
    trace_dir, out = tmp_path / "trace", tmp_path / "out"
    assert run(["-c", SCRIPT], {"TORCH_TRACE": str(trace_dir)}).returncode == 0
    res = subprocess.run([tlparse, *map(str, trace_dir.iterdir()), "-o", str(out), "--no-browser"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    listing = (out / "compile_directory.json").read_text()
    assert "fxfuse_report" in listing and "fxfuse_graph" in listing


def test_demo_times_the_variants_in_turns():
    import torch

    from fxfuse.cli import _time_round_robin

    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    ms = _time_round_robin(fns, torch.device("cpu"), reps=3)
    assert calls == ["a", "b"] * 3 and set(ms) == {"a", "b"}

