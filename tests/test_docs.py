"""Every ```python block in the README and docs/ runs, as written."""

from __future__ import annotations

import re
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
