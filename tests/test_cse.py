"""Siblings behind duplicated producers (cse.py): identical pure producers of
one input count as one sibling input; impure ones never do."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fxfuse
from fxfuse import FuseConfig, Reason

from conftest import call_ops, capture_with_inputs, fuse_and_compare, n_linear
from test_no_fuse import assert_left_alone


class AdaLN(nn.Module):
    """Three modulations, each on its own silu(t), as diffusers' AdaLayerNormZero writes them."""

    def __init__(self, cast: bool = False):
        super().__init__()
        self.cast = cast
        self.mods = nn.ModuleList(nn.Linear(8, n) for n in (24, 24, 16))
        self.act = nn.ModuleList(nn.SiLU() for _ in range(3))

    def forward(self, t):
        outs = []
        for act, lin in zip(self.act, self.mods):
            s = act(t)
            outs.append(lin(s.to(t.dtype) if self.cast else s))
        return torch.cat(outs, -1).sum(-1)


def test_fuse_duplicated_silu_producers():
    gm, inputs = capture_with_inputs(AdaLN(), torch.randn(2, 8))
    assert call_ops(gm).count("silu") == 3 and n_linear(gm) == 3
    report = fuse_and_compare(gm, inputs)
    assert report.removed == 2 and len(report.groups) == 1
    assert report.groups[0].widths == (24, 24, 16)
    # one silu left: the fused GEMM reads the first; the other two went with their calls
    assert call_ops(gm).count("silu") == 1 and n_linear(gm) == 1


def test_fuse_duplicated_producer_chains():
    gm, inputs = capture_with_inputs(AdaLN(cast=True), torch.randn(2, 8))
    assert call_ops(gm).count(".to") == 3
    report = fuse_and_compare(gm, inputs)
    assert report.removed == 2
    # the casts return their input (same dtype): they are silu(t) itself, and go too
    assert call_ops(gm).count("silu") == 1 and call_ops(gm).count(".to") == 0


def test_fuse_duplicated_module_producers_symbolic_trace():
    # call_module nn.SiLU (three instances) feeding call_module nn.Linear
    model = AdaLN()
    gm = torch.fx.symbolic_trace(model)
    t = torch.randn(2, 8)
    report = fuse_and_compare(gm, (t,))
    assert report.removed == 2


def test_unchanged_when_shared_producer_group_is_refused():
    # The duplicates are found, but the gate refuses the set: the graph stays as it was.
    gm, inputs = capture_with_inputs(AdaLN(), torch.randn(2, 8))
    assert_left_alone(gm, Reason.TOO_MANY_ROWS, 3, config=FuseConfig(max_rows=1), inputs=inputs)


def dropout_train(t, w1, w2):
    return F.linear(F.dropout(t, 0.5, True), w1), F.linear(F.dropout(t, 0.5, True), w2)


def rand_like_pair(t, w1, w2):
    return F.linear(t + torch.rand_like(t), w1), F.linear(t + torch.rand_like(t), w2)


def test_no_fuse_duplicated_dropout_in_training():
    t, w1, w2 = torch.randn(2, 8), torch.randn(4, 8), torch.randn(4, 8)
    gm, _ = capture_with_inputs(dropout_train, t, w1, w2)
    assert_left_alone(gm, Reason.PRODUCER_NOT_SHAREABLE, 2)  # random: no numerics to compare


def test_no_fuse_duplicated_rand_like():
    t, w1, w2 = torch.randn(2, 8), torch.randn(4, 8), torch.randn(4, 8)
    gm, _ = capture_with_inputs(rand_like_pair, t, w1, w2)
    # t + rand_like(t) is spelled alike twice, but rand_like is random: the adds differ
    assert_left_alone(gm, Reason.PRODUCER_NOT_SHAREABLE, 2)


def written_between(t, w1, w2):
    a = F.linear(F.silu(t), w1)
    t.mul_(2)  # the second silu reads another value
    b = F.linear(F.silu(t), w2)
    return a, b


def test_no_fuse_duplicated_producer_of_written_input():
    t, w1, w2 = torch.randn(2, 8), torch.randn(4, 8), torch.randn(4, 8)
    gm, inputs = capture_with_inputs(written_between, t, w1, w2)
    code = gm.code
    expected = gm(*[i.clone() for i in inputs])
    report = fxfuse.fuse_linears(gm)
    assert gm.code == code and report.removed == 0
    assert report.skipped[Reason.PRODUCER_NOT_SHAREABLE.value] == 2
    torch.testing.assert_close(gm(*[i.clone() for i in inputs]), expected)


def different_args(t, w1, w2):
    return F.linear(F.gelu(t), w1), F.linear(F.gelu(t, approximate="tanh"), w2)


def test_different_producer_arguments_are_not_siblings():
    t, w1, w2 = torch.randn(2, 8), torch.randn(4, 8), torch.randn(4, 8)
    gm, inputs = capture_with_inputs(different_args, t, w1, w2)
    code = gm.code
    report = fxfuse.fuse_linears(gm)
    assert gm.code == code and report.removed == 0 and not report.skipped


def grad_mode_between(t, w1, w2):
    a = F.linear(F.silu(t), w1)
    with torch.no_grad():
        s = F.silu(t)
    return a, F.linear(s, w2)


def test_no_fuse_duplicated_producer_across_grad_mode_change():
    t, w1, w2 = torch.randn(2, 8), torch.randn(4, 8), torch.randn(4, 8)
    gm, inputs = capture_with_inputs(grad_mode_between, t, w1, w2)
    assert any("set_grad_enabled" in str(n.target) for n in gm.graph.nodes)
    assert_left_alone(gm, Reason.PRODUCER_NOT_SHAREABLE, 2, inputs=inputs)
