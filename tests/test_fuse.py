"""Graph in, graph out: the groups fuse_linears rewrites, checked against eager."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import FileCheck

import fxfuse
from fxfuse import FuseConfig
from fxfuse.rewrite import SPLIT_SIZES_KEY

from conftest import call_ops, capture, capture_with_inputs, n_linear


class Siblings(nn.Module):
    """k linears on one input, with the given widths and biases."""

    def __init__(self, widths=(16, 8, 8), bias=(False, False, False), d=16):
        super().__init__()
        self.lins = nn.ModuleList(nn.Linear(d, n, bias=b) for n, b in zip(widths, bias))

    def forward(self, x):
        return tuple(lin(x) for lin in self.lins)


def fuse_and_check(model, *args, config=None, expect_removed):
    """Capture, fuse, compare with eager; return (graph, report)."""
    with torch.no_grad():
        ref = model(*args)
    gm, inputs = capture_with_inputs(model, *args)
    before = n_linear(gm)
    report = fxfuse.fuse_linears(gm, config)
    assert report.removed == expect_removed
    assert (report.before, report.after) == (before, before - expect_removed) == (before, n_linear(gm))
    with torch.no_grad():
        out = gm(*inputs)
    torch.testing.assert_close(tuple(out), ref if isinstance(ref, tuple) else (ref,))
    return gm, report


def test_fuse_qkv_3d_input():
    gm, report = fuse_and_check(Siblings(), torch.randn(2, 5, 16), expect_removed=2)
    # The graph returns q, k, v: as contiguous copies, with the strides of
    # the members' own outputs (code after the graph may .view(-1) them).
    assert call_ops(gm) == ["cat", "linear", "split"] + ["getitem", ".contiguous"] * 3
    (group,) = report.groups
    assert group.members == ("lins.0", "lins.1", "lins.2") and group.widths == (16, 8, 8)


def test_fuse_gqa_unequal_widths_and_group_of_five():
    widths = (32, 8, 8, 24, 4)
    gm, report = fuse_and_check(Siblings(widths, (False,) * 5), torch.randn(3, 16), expect_removed=4)
    assert report.groups[0].widths == widths
    fused = next(n for n in gm.graph.nodes if SPLIT_SIZES_KEY in n.meta)
    assert fused.meta[SPLIT_SIZES_KEY] == list(widths)


def test_fuse_any_rank_input():
    for shape in [(16,), (4, 16), (2, 3, 16), (2, 2, 3, 16)]:
        fuse_and_check(Siblings(), torch.randn(*shape), expect_removed=2)


def test_fuse_bias_all_present():
    gm, _ = fuse_and_check(Siblings(bias=(True, True, True)), torch.randn(2, 16), expect_removed=2)
    assert call_ops(gm).count("cat") == 2 and ".new_zeros" not in call_ops(gm)


def test_fuse_bias_mixed_counts_missing_as_zeros():
    gm, report = fuse_and_check(Siblings(bias=(True, False, True)), torch.randn(2, 16), expect_removed=2)
    assert call_ops(gm).count(".new_zeros") == 1
    assert report.groups[0].bias == (True, False, True)


def test_fuse_functional_linear_with_kwargs_and_computed_weight():
    w1, w2, b = torch.randn(8, 16), torch.randn(4, 16), torch.randn(4)

    def f(x, w1, w2, b):
        a = F.linear(x, w1 * 2)  # a weight computed in the graph
        c = F.linear(input=x, weight=w2.t().t(), bias=b)
        return a.relu(), c

    fuse_and_check(f, torch.randn(3, 16), w1, w2, b, expect_removed=1)


def test_fuse_symbolic_trace_call_module():
    model = Siblings(bias=(True, False, False))
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 16)
    report = fxfuse.fuse_linears(gm)
    assert report.removed == 2 and report.groups[0].members == ("lins.0", "lins.1", "lins.2")
    FileCheck().check("torch.cat").check("linear").check("split").run(gm.code)
    torch.testing.assert_close(gm(x), model(x))


def test_fuse_keeps_meta():
    gm = capture(Siblings(), torch.randn(2, 16))
    members = [n for n in gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    metas = [dict(n.meta) for n in members]
    fxfuse.fuse_linears(gm)
    pieces = [n for n in gm.graph.nodes if n.op == "call_function" and n.name.startswith("getitem")]
    for piece, meta in zip(pieces, metas):
        assert piece.meta["example_value"].shape == meta["example_value"].shape
        assert piece.meta["stack_trace"] == meta["stack_trace"]
        assert piece.meta["nn_module_stack"] == meta["nn_module_stack"]
    fused = next(n for n in gm.graph.nodes if SPLIT_SIZES_KEY in n.meta)
    assert tuple(fused.meta["example_value"].shape) == (2, 32)
    assert "stack_trace" in fused.meta
    # The pieces are views of the fused output: their strides say so.
    assert all(p.meta["example_value"].stride() == (32, 1) for p in pieces)


def test_fuse_groups_in_graph_order_is_deterministic():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Siblings(), Siblings((4, 4), (False, False))

        def forward(self, x, y):
            return self.b(y) + self.a(x)

    x, y = torch.randn(2, 16), torch.randn(2, 16)
    reports = [fxfuse.fuse_linears(capture(Two(), x, y)) for _ in range(2)]
    assert [g.members for g in reports[0].groups] == [g.members for g in reports[1].groups]
    assert [g.members[0] for g in reports[0].groups] == ["b.lins.0", "a.lins.0"]


def test_fuse_min_group_size_both_sides_of_the_limit():
    x = torch.randn(2, 16)
    _, at = fuse_and_check(Siblings(), x, config=FuseConfig(min_group_size=3), expect_removed=2)
    _, above = fuse_and_check(Siblings(), x, config=FuseConfig(min_group_size=4), expect_removed=0)
    assert above.skipped == {"below_min_group_size": 3} and not at.skipped


def test_fuse_max_group_size_chunks():
    _, report = fuse_and_check(
        Siblings((8,) * 5, (False,) * 5), torch.randn(2, 16), config=FuseConfig(max_group_size=2), expect_removed=2
    )
    # 5 siblings in chunks of 2: [2, 2] fuse, the last one is alone.
    assert [len(g.members) for g in report.groups] == [2, 2]
    assert report.skipped == {"below_min_group_size": 1}


def test_fuse_should_fuse_callback_sees_group():
    seen = []

    def only_big(group):
        seen.append(group.names)
        return len(group.members) > 2

    x = torch.randn(2, 16)
    fuse_and_check(Siblings(), x, config=FuseConfig(should_fuse=only_big), expect_removed=2)
    assert seen == [["lins.0", "lins.1", "lins.2"]]


def test_fuse_report_counters_and_table():
    _, report = fuse_and_check(Siblings(bias=(True, False, False)), torch.randn(2, 16), expect_removed=2)
    counters = torch._dynamo.utils.counters["fxfuse"]
    assert counters["linear_calls_removed"] == 2 and counters["groups_fused"] == 1
    text = str(report)
    assert "3 -> 1 linear calls" in text and "lins.0+b, lins.1, lins.2" in text and "16+8+8" in text


def test_fuse_matmul_forms_in_one_group():
    def f(x, w1, w2, w3, w4, b1, b4):
        a = x @ w1.T + b1
        c = torch.matmul(x, w2.t())
        d = x.matmul(w3.transpose(0, 1))
        e = b4 + x @ w4.permute(1, 0)
        g = F.linear(x, w2)  # an exact duplicate of c, in another form
        return a, c, d, e, g * 2  # (g itself returned would stay its own call)

    args = (torch.randn(2, 3, 8), *(torch.randn(n, 8) for n in (4, 6, 4, 2)), torch.randn(4), torch.randn(2))
    gm, report = fuse_and_check(f, *args, expect_removed=4)
    assert call_ops(gm).count("linear") == 1 and "matmul" not in call_ops(gm) and "add" not in call_ops(gm)
    assert report.groups[0].bias == (True, False, False, True, False)
    assert report.groups[0].widths == (4, 6, 4, 2, 6)


def test_fuse_addmm_with_linear():
    def f(x, w1, w2, b):
        return torch.addmm(b, x, w1.t()), F.linear(x, w2)

    gm, _ = fuse_and_check(f, torch.randn(3, 8), torch.randn(4, 8), torch.randn(5, 8), torch.randn(4),
                           expect_removed=1)
    assert "addmm" not in call_ops(gm)


def test_fuse_matmul_add_that_is_not_a_bias_stays_an_add():
    def f(x, w1, w2, c):
        return x @ w1.T + c, F.linear(x, w2)  # c is [3, 4]: not a per-channel bias

    gm, report = fuse_and_check(f, torch.randn(3, 8), torch.randn(4, 8), torch.randn(5, 8), torch.randn(3, 4),
                                expect_removed=1)
    assert "add" in call_ops(gm) and report.groups[0].bias == (False, False)


def test_fuse_matmul_by_a_non_transposed_weight_is_not_a_linear():
    def f(x, w1, w2):
        return x @ w1, x @ w2  # [K, N] weights: matmuls, not linears

    gm = capture(f, torch.randn(3, 8), torch.randn(8, 4), torch.randn(8, 4))
    code = gm.code
    report = fxfuse.fuse_linears(gm)
    assert report.before == 0 and gm.code == code


def test_fuse_exact_duplicates_computed_once():
    def f(x, w, b, w2):
        return F.linear(x, w, b), F.linear(x, w, b).relu(), F.linear(x, w2)

    gm, report = fuse_and_check(f, torch.randn(3, 8), torch.randn(4, 8), torch.randn(4), torch.randn(2, 8),
                                expect_removed=2)
    assert call_ops(gm).count("linear") == 1
    assert report.groups[0].members[:2] == ("linear", "linear_2") and len(report.groups[0].members) == 3


def test_fuse_only_duplicates_needs_no_cat_or_split():
    def f(x, w):
        return F.linear(x, w), F.linear(x, w) * 2

    gm, _ = fuse_and_check(f, torch.randn(3, 8), torch.randn(4, 8), expect_removed=1)
    assert call_ops(gm) == ["linear", "mul"]


def test_fuse_member_names_are_module_paths_whatever_the_root():
    model = Siblings()

    def through_list(models, x):  # Dynamo names the root L['models'][0]
        return models[0](x)

    gm = capture(through_list, [model], torch.randn(2, 16))
    assert fxfuse.fuse_linears(gm).groups[0].members == ("lins.0", "lins.1", "lins.2")
