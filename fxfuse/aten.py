"""Linear calls in aten graphs (Inductor's joint and post-grad graphs,
exported programs), and the aten ops that replace a fused group.

AOTAutograd decomposes ``F.linear`` on a ``[B, S, K]`` input into

    view   = aten.view(x, [B*S, K])           # one view per linear, same source
    wt     = aten.permute(w, [1, 0])          # or aten.t(w)
    out    = aten.addmm(b, view, wt)          # aten.mm(view, wt) without bias
    y      = aten.view(out, [B, S, N])

so the siblings are the mm/addmm nodes whose input views the same source
node with the same shape. torch.export keeps ``aten.linear(x, w, b)``.
The group is rewritten in the same dialect: one view, one permute of the
concatenated weights, one mm/addmm, one split along the last dim.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import fx

if TYPE_CHECKING:
    from .match import Linear

aten = torch.ops.aten

__all__ = ["as_aten_linear", "is_aten_group", "emit_aten"]

_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _weight_of(gm: fx.GraphModule, wt: object, value_of: Callable) -> Optional[fx.Node]:
    """w if `wt` is ``permute(w, [1, 0])`` or ``t(w)`` of a 2-D w."""
    if not isinstance(wt, fx.Node) or wt.op != "call_function":
        return None
    if wt.target is aten.t.default or (wt.target is aten.permute.default and list(wt.args[1]) == [1, 0]):
        w = wt.args[0]
        v = value_of(gm, w) if isinstance(w, fx.Node) else None
        return w if isinstance(v, torch.Tensor) and v.dim() == 2 else None  # type: ignore[return-value]
    return None


def as_aten_linear(
    gm: fx.GraphModule, node: fx.Node, value_of: Callable, make: Callable, name_of: Callable
) -> Optional["Linear"]:
    """The `Linear` view of an aten mm / addmm / linear node, or None."""
    if node.op != "call_function" or node.kwargs:
        return None
    name = name_of(node) or node.name
    if node.target is aten.linear.default:
        x, w, *rest = node.args
        b = rest[0] if rest else None
        if not isinstance(x, fx.Node) or not isinstance(w, fx.Node) or not (b is None or isinstance(b, fx.Node)):
            return None
        return make(node, x, w, b, name)
    if node.target is aten.mm.default and len(node.args) == 2:
        b, (a, wt) = None, node.args
    elif node.target is aten.addmm.default and len(node.args) == 3:
        b, a, wt = node.args
        vb = value_of(gm, b) if isinstance(b, fx.Node) else None
        if not (isinstance(vb, torch.Tensor) and vb.dim() == 1):
            return None  # a 2-D "bias" is not a linear's
    else:
        return None
    w = _weight_of(gm, wt, value_of)
    if w is None or not isinstance(a, fx.Node):
        return None
    # Siblings each view the same source: group by the source.
    x = a.args[0] if a.op == "call_function" and a.target in _VIEWS and isinstance(a.args[0], fx.Node) else a
    dead = (wt, a) if x is not a else (wt,)
    return make(node, x, w, b, name, dead=dead)


def is_aten_group(members: list["Linear"]) -> bool:
    return isinstance(members[0].node.target, torch._ops.OpOverload)


def emit_aten(graph: fx.Graph, members: list["Linear"], x: fx.Node, weight: fx.Node,
              bias: Optional[fx.Node], widths: list[int]) -> tuple[fx.Node, fx.Node, list[fx.Node]]:
    """Insert the fused GEMM (at the graph's insert point) in the members'
    dialect; return (fused node, split node, pieces)."""
    ref = members[0].node
    if ref.target is aten.linear.default:
        fused = graph.call_function(aten.linear.default, (x, weight, bias))
    else:
        a = ref.args[1] if ref.target is aten.addmm.default else ref.args[0]  # the member's view of x
        wt = graph.call_function(aten.permute.default, (weight, [1, 0]))
        if bias is None:
            fused = graph.call_function(aten.mm.default, (a, wt))
        else:
            fused = graph.call_function(aten.addmm.default, (bias, a, wt))
    parts = graph.call_function(aten.split_with_sizes.default, (fused, list(widths), -1))
    outs = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(members))]
    return fused, parts, outs
