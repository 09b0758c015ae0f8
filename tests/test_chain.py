"""Groups fed by another group's member output (chains), in every entry point.

    b = B(x); a = A(x)        # group 1 on x: {a, b}
    c = C(b); d = D(b)        # group 2 on b: {c, d}, b a member of group 1

After group 1 is rewritten, b is a piece of the fused output: group 2 must
read that piece, whichever group is rewritten first.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch._inductor.utils import run_and_get_code

import fxfuse
from fxfuse import FuseConfig
from fxfuse.inductor import HOOKS

from conftest import capture_with_inputs, n_linear


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 12, bias=False)
        self.b = nn.Linear(8, 4, bias=False)
        self.c = nn.Linear(4, 8, bias=False)
        self.d = nn.Linear(4, 8, bias=False)

    def forward(self, x):
        b = self.b(x)
        return self.a(x), self.c(b), self.d(b)


class ThreeDeep(nn.Module):
    """Three groups in a chain, with biases, the middle one read through a view."""

    def __init__(self):
        super().__init__()
        self.p = nn.ModuleList(nn.Linear(16, n) for n in (16, 8))
        self.q = nn.ModuleList(nn.Linear(16, n, bias=False) for n in (8, 8, 16))
        self.r = nn.ModuleList(nn.Linear(8, n) for n in (4, 4))

    def forward(self, x):
        p0, p1 = (m(x) for m in self.p)
        h = torch.relu(p0)
        q0, q1, q2 = (m(h) for m in self.q)
        v = q1.view(-1, 8)
        r = [m(v) for m in self.r]
        return p1 * 2, q0 + 1, q2, r[0], r[1]


class SameAnchor(nn.Module):
    """Both groups go before c: group 1 waits for its computed weight w,
    made just before c; group 2 starts at c. Group 1's pieces must come first."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.randn(12, 8)), nn.Linear(8, 4, bias=False)
        self.c, self.d = nn.Linear(4, 8, bias=False), nn.Linear(4, 8, bias=False)

    def forward(self, x):
        b = self.b(x)
        w = self.a * 2
        c = self.c(b)
        a = torch.nn.functional.linear(x, w)
        return a, c, self.d(b)


def _model(cls):
    torch.manual_seed(0)
    return cls().eval()


@pytest.mark.parametrize("weights", ["auto", "cat"])
@pytest.mark.parametrize("cls, removed", [(Chain, 2), (ThreeDeep, 4)])
def test_fuse_chain_backend(cls, removed, weights):
    model, x = _model(cls), torch.randn(3, 16 if cls is ThreeDeep else 8)
    be = fxfuse.backend(inner="eager", weights=weights, strict=True)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend=be, fullgraph=True)(x)
        torch.testing.assert_close(out, ref)
        out = torch.compile(model, backend=be, fullgraph=True)(x)  # second call: fused tensors from storage
    torch.testing.assert_close(out, ref)
    assert be.report.removed == removed and not be.report.errors


@pytest.mark.parametrize("order", ["plan", "reversed"])
@pytest.mark.parametrize("cls, removed", [(Chain, 2), (ThreeDeep, 4), (SameAnchor, 2)])
def test_fuse_chain_either_rewrite_order(cls, removed, order, monkeypatch):
    """The consumer group listed first still reads the producer's piece."""
    import fxfuse.fuse as fuse

    real = fuse.plan

    def plan(*args, **kwargs):
        groups, skipped, n = real(*args, **kwargs)
        return (groups[::-1] if order == "reversed" else groups), skipped, n

    monkeypatch.setattr(fuse, "plan", plan)
    model, x = _model(cls), torch.randn(3, 16 if cls is ThreeDeep else 8)
    gm, inputs = capture_with_inputs(model, x)
    before = n_linear(gm)
    report = fxfuse.fuse_linears(gm, FuseConfig(strict=True))
    assert report.removed == removed and n_linear(gm) == before - removed
    gm.graph.lint()
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(x))


def test_fuse_chain_symbolic_trace():
    model, x = _model(Chain), torch.randn(3, 8)
    gm = torch.fx.symbolic_trace(model)
    report = fxfuse.fuse_linears(gm, FuseConfig(strict=True))
    assert report.removed == 2
    torch.testing.assert_close(gm(x), model(x))


GEMM = re.compile(r"extern_kernels\.(?:mm|addmm)\(")


@pytest.mark.parametrize("hook", HOOKS)
def test_fuse_chain_inductor_hooks(hook):
    model, x = _model(Chain), torch.randn(3, 8)
    with torch.no_grad():
        ref = model(x)
        with torch._inductor.config.patch(fx_graph_cache=False):
            _, plain = run_and_get_code(torch.compile(model), x)
            torch._dynamo.reset()
            with fxfuse.installed(hook, strict=True) as p:
                out, fused = run_and_get_code(torch.compile(model), x)
    torch.testing.assert_close(out, ref)
    assert p.report.removed == 2
    assert sum(len(GEMM.findall(c)) for c in plain) - sum(len(GEMM.findall(c)) for c in fused) == 2


def test_fuse_chain_exported():
    model, x = _model(Chain), torch.randn(3, 8)
    ep = torch.export.export(model, (x,))
    fused = fxfuse.fuse_exported(ep, strict=True)
    assert fused.fxfuse_report.removed == 2
    torch.testing.assert_close(fused.module()(x), model(x))


@torch.library.custom_op("fxfuse_test::needs_contiguous", mutates_args=())
def needs_contiguous(t: torch.Tensor) -> torch.Tensor:
    # A custom kernel that assumes eager's layout, as many do.
    assert t.is_contiguous(), f"strides {t.stride()} for shape {tuple(t.shape)}"
    return t * 2


@needs_contiguous.register_fake
def _(t):
    return torch.empty_like(t)


class CustomOpReader(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return needs_contiguous(self.q(x)) + 1, self.k(x).relu()


@pytest.mark.parametrize("entry", ["backend", "post_grad_custom_pre_pass", "export"])
def test_fuse_piece_read_by_custom_op_is_contiguous(entry):
    """The op sees the strides eager gives it: its piece is a contiguous copy."""
    model, x = _model(CustomOpReader), torch.randn(3, 8)
    with torch.no_grad():
        ref = model(x)
        if entry == "backend":
            be = fxfuse.backend(inner="eager", strict=True)
            out, removed = torch.compile(model, backend=be)(x), lambda: be.report.removed
        elif entry == "export":
            fused = fxfuse.fuse_exported(torch.export.export(model, (x,)), strict=True)
            out, removed = fused.module()(x), lambda: fused.fxfuse_report.removed
        else:
            with torch._inductor.config.patch(fx_graph_cache=False), fxfuse.installed(entry, strict=True) as p:
                out, removed = torch.compile(model)(x), lambda: p.report.removed
    torch.testing.assert_close(out, ref)
    assert removed() == 1
