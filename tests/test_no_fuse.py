"""One test per refusal: the graph is unchanged and the reason is counted."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing._internal.two_tensor import TwoTensor

import fxfuse
from fxfuse import FuseConfig, Reason

from conftest import capture, capture_with_inputs


def assert_left_alone(gm, reason: Reason, calls: int, config=None, inputs=None):
    code = gm.code
    expected = gm(*inputs) if inputs is not None else None
    report = fxfuse.fuse_linears(gm, config)
    assert gm.code == code, "graph changed"
    assert report.removed == 0 and not report.groups
    assert report.skipped[reason.value] == calls, report.skipped
    assert torch._dynamo.utils.counters["fxfuse_skipped"][reason.value] == calls
    if inputs is not None:
        torch.testing.assert_close(gm(*inputs), expected)
    return report


def pair(x, w1, w2):
    return F.linear(x, w1), F.linear(x, w2)


class Pair(nn.Module):
    def __init__(self, a: nn.Linear, b: nn.Linear):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return self.a(x), self.b(x)


def test_no_fuse_unknown_weight():
    gm = torch.fx.symbolic_trace(pair)  # placeholders carry no tensor metadata
    assert_left_alone(gm, Reason.UNKNOWN_WEIGHT, 2)


def test_no_fuse_tensor_subclass_weight():
    x, w1, w2 = torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, 4)
    gm = torch.fx.symbolic_trace(pair)
    for node, w in zip(list(gm.graph.nodes)[1:3], (w1, w2)):
        node.meta["val"] = TwoTensor(w, w.clone())
    assert_left_alone(gm, Reason.TENSOR_SUBCLASS, 2, inputs=(x, w1, w2))


def test_no_fuse_weight_not_2d():
    x, w1, w2 = torch.randn(2, 4), torch.randn(4), torch.randn(4)  # 1-D weights are legal linears
    gm, inputs = capture_with_inputs(pair, x, w1, w2)
    assert_left_alone(gm, Reason.WEIGHT_NOT_2D, 2, inputs=inputs)


def test_no_fuse_symbolic_weight_shape():
    x, w1, w2 = torch.randn(2, 4), torch.randn(3, 4), torch.randn(5, 4)
    gm, inputs = capture_with_inputs(pair, x, w1, w2, dynamic=True)
    assert_left_alone(gm, Reason.SYMBOLIC_SHAPE, 2, inputs=inputs)


def test_no_fuse_bias_shape_or_dtype():
    def f(x, w1, w2, b):
        return F.linear(x, w1, b), F.linear(x, w2)

    # A 1-element bias broadcasts in eager; it is not a per-channel bias.
    args = (torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, 4), torch.randn(1))
    gm, inputs = capture_with_inputs(f, *args)
    assert_left_alone(gm, Reason.BAD_BIAS, 1, inputs=inputs)


def test_no_fuse_dtype_mismatch():
    gm = torch.fx.symbolic_trace(Pair(nn.Linear(4, 3), nn.Linear(4, 3, dtype=torch.float64)))
    assert_left_alone(gm, Reason.DTYPE_MISMATCH, 2)  # both calls stay unfused


def test_no_fuse_device_mismatch():
    gm = torch.fx.symbolic_trace(Pair(nn.Linear(4, 3), nn.Linear(4, 3, device="meta")))
    assert_left_alone(gm, Reason.DEVICE_MISMATCH, 2)


def test_no_fuse_in_features_mismatch():
    gm = torch.fx.symbolic_trace(Pair(nn.Linear(4, 3), nn.Linear(5, 3)))
    assert_left_alone(gm, Reason.IN_FEATURES_MISMATCH, 2)


def test_no_fuse_weights_need_grad_when_training_is_off():
    # Only the backend knows the graph runs with autograd (Dynamo traced it so).
    model = Pair(nn.Linear(4, 3), nn.Linear(4, 3))
    seen = []
    be = fxfuse.backend(inner=lambda gm, ex: seen.append(gm.code) or gm.forward)
    x = torch.randn(2, 4)
    out = torch.compile(model, backend=be)(x)
    torch.testing.assert_close(out, model(x))
    assert be.report.removed == 0 and be.report.skipped == {Reason.NEEDS_GRAD.value: 2}
    assert torch._dynamo.utils.counters["fxfuse_skipped"][Reason.NEEDS_GRAD.value] == 2
    assert "split" not in seen[0] and seen[0].count("linear(") == 2


def test_no_fuse_below_min_group_size():
    model = Pair(nn.Linear(4, 3), nn.Linear(4, 3))
    assert_left_alone(torch.fx.symbolic_trace(model), Reason.BELOW_MIN_GROUP_SIZE, 2,
                      config=FuseConfig(min_group_size=3))


def test_no_fuse_member_depends_on_member():
    def f(x, wq, wk):
        q = F.linear(x, wq)
        k = F.linear(x, wk + q.sum())  # k's weight needs q
        return q, k

    gm, inputs = capture_with_inputs(f, torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, 4))
    assert_left_alone(gm, Reason.MEMBER_DEPENDS_ON_MEMBER, 2, inputs=inputs)


def _add_to_input(x, wq, wk):
    x.add_(1)


def _mul_weight(x, wq, wk):
    torch.Tensor.mul_(wk, 2)


def _setitem_view_of_input(x, wq, wk):
    x.view(-1)[0] = 5.0


@pytest.mark.parametrize("mutate", [_add_to_input, _mul_weight, _setitem_view_of_input])
def test_no_fuse_mutation_between_members(mutate):
    def f(x, wq, wk):
        q = F.linear(x, wq)
        mutate(x, wq, wk)
        k = F.linear(x, wk)
        return q, k

    def args():
        torch.manual_seed(0)
        return torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, 4)

    gm = capture(f, *args())
    assert_left_alone(gm, Reason.MUTATION_BETWEEN_MEMBERS, 2)
    # Fusing would have read the mutated values for q: the graph still agrees with eager.
    torch.testing.assert_close(gm(*args()), f(*args()))


def test_no_fuse_no_legal_position():
    def f(x, wq, wk):
        q = F.linear(x, wq)
        s = q.sum()  # q is used ...
        wk2 = wk * 2  # ... before k's weight exists
        return s, F.linear(x, wk2)

    gm, inputs = capture_with_inputs(f, torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, 4))
    assert_left_alone(gm, Reason.NO_LEGAL_POSITION, 2, inputs=inputs)


def test_no_fuse_vetoed_by_should_fuse():
    gm = torch.fx.symbolic_trace(Pair(nn.Linear(4, 3), nn.Linear(4, 3)))
    assert_left_alone(gm, Reason.VETOED, 2, config=FuseConfig(should_fuse=lambda g: False))


def test_no_fuse_error_in_pass_restores_graph(monkeypatch):
    import fxfuse.rewrite

    real, calls = fxfuse.rewrite._set_values, []

    def fails_in_second_group(*args):
        calls.append(args)
        if len(calls) > 1:  # the first group is rewritten, the second fails half-way
            raise RuntimeError("boom")
        return real(*args)

    monkeypatch.setattr(fxfuse.rewrite, "_set_values", fails_in_second_group)

    def f(x, y, w1, w2):
        return F.linear(x, w1), F.linear(x, w2), F.linear(y, w1), F.linear(y, w2)

    gm, inputs = capture_with_inputs(f, *(torch.randn(2, 4) for _ in range(2)), *(torch.randn(3, 4) for _ in range(2)))
    report = assert_left_alone(gm, Reason.ERROR, 4, inputs=inputs)
    assert "boom" in report.errors[0]
    calls.clear()
    with pytest.raises(RuntimeError, match="boom"):
        fxfuse.fuse_linears(gm, FuseConfig(strict=True))


def test_no_fuse_input_rows_above_max_rows():
    model = Pair(nn.Linear(4, 3), nn.Linear(4, 3))
    x = torch.randn(2, 5, 4)  # 10 rows
    gm, inputs = capture_with_inputs(model, x)
    assert_left_alone(gm, Reason.TOO_MANY_ROWS, 2, config=FuseConfig(max_rows=9), inputs=inputs)


def test_fuse_at_max_rows_exactly():
    model = Pair(nn.Linear(4, 3), nn.Linear(4, 3))
    gm, inputs = capture_with_inputs(model, torch.randn(2, 5, 4))
    with torch.no_grad():
        expected = gm(*inputs)
    assert fxfuse.fuse_linears(gm, FuseConfig(max_rows=10)).removed == 1
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), expected)


def test_no_fuse_weight_3d():
    x, w1, w2 = torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, 4)
    gm = torch.fx.symbolic_trace(pair)
    for node, w in zip(list(gm.graph.nodes)[1:3], (w1, w2)):
        node.meta["val"] = w.unsqueeze(0)  # what a 3-D weight would look like
    assert_left_alone(gm, Reason.WEIGHT_NOT_2D, 2, inputs=(x, w1, w2))


def test_higher_order_ops_compile_and_match():
    """torch.cond and activation checkpointing: the backend neither raises nor
    changes a result; siblings outside the regions still fuse."""
    class WithRegions(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            self.c, self.d = nn.Linear(8, 8), nn.Linear(8, 8)

        def inner(self, x):
            return self.c(x) * self.d(x)

        def forward(self, x):
            y = self.a(x) + self.b(x)
            z = torch.utils.checkpoint.checkpoint(self.inner, y, use_reentrant=False)
            return torch.cond(z.sum() > 0, lambda t: self.c(t) + self.d(t), lambda t: t * 2, (z,))

    model, x = WithRegions(), torch.randn(3, 8, requires_grad=True)
    be = fxfuse.backend(inner="eager", training=True)
    out = torch.compile(model, backend=be)(x)
    torch.testing.assert_close(out, model(x))
    assert be.report.errors == [] and be.report.removed >= 1


def test_no_fuse_repeated_call_output_leaves_graph():
    # Computed once, the two results would be one tensor returned twice:
    # writing one would change the other.
    def twice(x, w):
        return F.linear(x, w), F.linear(x, w)

    gm, inputs = capture_with_inputs(twice, torch.randn(2, 4), torch.randn(3, 4))
    report = assert_left_alone(gm, Reason.DUPLICATE_OUTPUT_LEAVES_GRAPH, 1, inputs=inputs)
    assert report.skipped == {"repeated_call_output_leaves_graph": 1, "below_min_group_size": 1}


def test_no_fuse_unused_output():
    # Dynamo keeps dead code; fused, the dead call's weight would get a zero
    # gradient where eager leaves .grad None. Dead through a user too.
    def f(x, w1, w2, w3):
        a = F.linear(x, w1)
        F.linear(x, w2)
        torch.tanh(F.linear(x, w3))
        return a * 2

    gm, inputs = capture_with_inputs(f, torch.randn(2, 4), *(torch.randn(3, 4) for _ in range(3)))
    assert sum(n.op == "call_function" and n.target is torch.tanh for n in gm.graph.nodes) == 1
    report = assert_left_alone(gm, Reason.UNUSED_OUTPUT, 2, inputs=inputs)
    assert report.skipped == {"unused_output": 2, "below_min_group_size": 1}


def test_no_fuse_third_repeat_returned_with_the_second():
    def thrice(x, w):
        a = F.linear(x, w)
        return a + 1, F.linear(x, w), F.linear(x, w)

    gm, inputs = capture_with_inputs(thrice, torch.randn(2, 4), torch.randn(3, 4))
    report = fxfuse.fuse_linears(gm)
    assert report.removed == 1 and report.skipped == {"repeated_call_output_leaves_graph": 1}
    _, b, c = gm(*inputs)
    assert b is not c and b.data_ptr() != c.data_ptr()
