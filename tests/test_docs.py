"""Every ```python block in the README and docs/ runs, as written; the guide's shell commands do what it says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def blocks():
    for doc in DOCS:
        for i, code in enumerate(BLOCK.findall(doc.read_text())):
            yield pytest.param(code, id=f"{doc.relative_to(ROOT)}#{i}")


def test_docs_have_code_blocks():
    assert len(list(blocks())) >= 8


@pytest.mark.parametrize("code", list(blocks()))
def test_doc_block_runs(code, capsys):
    torch._dynamo.reset()
    exec(compile(code, "<doc block>", "exec"), {"__name__": "__doc_block__"})


def guide_command(needle: str) -> str:
    (line,) = [ln for ln in (ROOT / "docs" / "guide.md").read_text().splitlines() if needle in ln]
    return line


def test_guide_linear_count_counts_the_graph_after_the_rewrite():
    # The documented pipeline, on the log of the documented run: it must give
    # the "-> N linear calls" of the INFO line in the same log.
    run_part, count_part = guide_command('grep -c "nn.linear("').split(" 2>&1 | ", 1)
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_LOGS", "TORCH_TRACE")}
    env["TORCH_LOGS"] = "+fxfuse"
    cmd = run_part.replace('TORCH_LOGS="+fxfuse" python ', f"{sys.executable} ", 1)
    log = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert log.returncode == 0, log.stderr
    text = log.stdout + log.stderr
    (after,) = {int(n) for n in re.findall(r"fxfuse: \d+ -> (\d+) linear calls", text)}
    res = subprocess.run(["bash", "-c", count_part], input=text, capture_output=True, text=True, timeout=60)
    assert int(res.stdout) == after


def test_guide_tlparse_writes_outside_the_clone():
    line = guide_command("tlparse ")
    assert "$(mktemp -d)" in line and "-o $d/" in line
