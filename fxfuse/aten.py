"""Linear calls in aten graphs (Inductor's joint and post-grad graphs,
exported programs), and the aten ops that replace a fused group.

AOTAutograd decomposes ``F.linear`` on a ``[B, S, K]`` input into

    view   = aten.view(x, [B*S, K])           # one view per linear, same source
    wt     = aten.permute(w, [1, 0])          # or aten.t(w)
    out    = aten.addmm(b, view, wt)          # aten.mm(view, wt) without bias
    y      = aten.view(out, [B, S, N])

so the siblings are the mm/addmm nodes whose input views the same source
node with the same shape. torch.export keeps ``aten.linear(x, w, b)``.

Weight-only quantization (``linear(x, w.to(dt)) * s (+ b)`` in the model)
adds a cast of the stored weight, before or after the transpose, and the
per-channel scales after the GEMM:

    wt  = aten.permute(prims.convert_element_type(w_int8, f32), [1, 0])
    out = aten.mm(view, wt)
    y   = aten.add(aten.mul(aten.view(out, [B, S, N]), s), b)
    # export: aten.mul(aten.linear(x, aten.to(w_int8, f32)), s); after
    # run_decompositions the cast is aten._to_copy(w_int8, dtype=f32)

Such a member's weight is the stored w, its `cast` the dtype and its `scale`
s, as at the torch level (see match.py).

The group is rewritten in the same dialect: one view, one cast of the
concatenated stored weights (the members' own cast op), one permute, one
mm/addmm (or aten.linear), the members' output view; rewrite.py adds the
multiply, the bias add and the split.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import fx

from .forms import Linear, module_path, scaled, value_of
from .qforms import as_quantized_linear

aten, prims = torch.ops.aten, torch.ops.prims

__all__ = ["as_aten_linear", "is_aten_group", "emit_aten", "emit_cast"]

_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _untransposed(n: fx.Node) -> Optional[object]:
    """w if `n` is ``permute(w, [1, 0])`` or ``t(w)``."""
    if n.target is aten.t.default or (n.target is aten.permute.default and list(n.args[1]) == [1, 0]):
        return n.args[0]
    return None


def _cast_of(n: object) -> Optional[tuple[object, object]]:
    """(w, dtype) if `n` casts w to dtype and does nothing else."""
    if not isinstance(n, fx.Node) or n.op != "call_function":
        return None
    args, kwargs = n.args, n.kwargs
    if n.target in (prims.convert_element_type.default, aten.to.dtype) and len(args) == 2 and not kwargs:
        return args[0], args[1]
    if n.target is aten._to_copy.default and len(args) == 1 and list(kwargs) == ["dtype"]:
        return args[0], kwargs["dtype"]
    return None


def _changes_dtype(gm: fx.GraphModule, cast: Optional[tuple[object, object]]) -> bool:
    """Is `cast` (from `_cast_of`) a real conversion of a tensor to another dtype?"""
    if cast is None or not isinstance(cast[0], fx.Node) or not isinstance(cast[1], torch.dtype):
        return False
    v = value_of(gm, cast[0])
    return isinstance(v, torch.Tensor) and v.dtype != cast[1]


def _stored_weight(
    gm: fx.GraphModule, wt: object
) -> Optional[tuple[fx.Node, Optional[torch.dtype], tuple[fx.Node, ...]]]:
    """(w, cast dtype or None, the nodes peeled) if the mm operand `wt` is
    t(w), t(cast(w)) or cast(t(w)) of a 2-D w."""
    n, cast, peeled = wt, None, []
    while isinstance(n, fx.Node) and n.op == "call_function":
        if (inner := _untransposed(n)) is not None:
            peeled.append(n)
            v = value_of(gm, inner) if isinstance(inner, fx.Node) else None
            if not (isinstance(v, torch.Tensor) and v.dim() == 2):
                return None
            if cast is None and _changes_dtype(gm, c := _cast_of(inner)):
                (inner, cast), peeled = c, [*peeled, inner]  # type: ignore[misc]
            return inner, cast, tuple(peeled)  # type: ignore[return-value]
        if cast is not None or not _changes_dtype(gm, c := _cast_of(n)):
            return None
        (n, cast), peeled = c, [n]  # type: ignore[misc]
    return None


def _output_view(gm: fx.GraphModule, node: fx.Node, width: int) -> Optional[fx.Node]:
    """The view of a 2-D GEMM result back to the input's leading dims, if it is
    the result's only user. Its shape is reused for the fused result, so its
    sizes must be known anywhere: constants or graph inputs (symbolic sizes)."""
    if len(node.users) != 1:
        return None
    (view,) = node.users
    if view.target not in _VIEWS or view.args[0] is not node or len(view.args) != 2:
        return None
    v = value_of(gm, view)
    if not isinstance(v, torch.Tensor) or v.shape[-1] != width:
        return None
    if not all(isinstance(d, int) or (isinstance(d, fx.Node) and d.op == "placeholder") for d in view.args[1]):
        return None
    return view


def as_aten_linear(gm: fx.GraphModule, node: fx.Node) -> Optional[Linear]:
    """The `Linear` view of an aten mm / addmm / linear node, or None."""
    if node.op != "call_function" or node.kwargs:
        return None
    if (quantized := as_quantized_linear(gm, node)) is not None:
        return quantized  # torchao's forms (qforms.py)
    name = module_path(node) or node.name
    if node.target is aten.linear.default:
        x, w, *rest = node.args
        b = rest[0] if rest else None
        if not isinstance(x, fx.Node) or not isinstance(w, fx.Node) or not (b is None or isinstance(b, fx.Node)):
            return None
        cast = _cast_of(w)
        if not _changes_dtype(gm, cast):
            return Linear(node, x, w, b, name)
        (w, dtype), dead = cast, (w,)  # type: ignore[misc]
        return _dequantized(gm, node, node, x, w, b, dtype, dead, name)
    if node.target is aten.mm.default and len(node.args) == 2:
        b, (a, wt) = None, node.args
    elif node.target is aten.addmm.default and len(node.args) == 3:
        b, a, wt = node.args
        vb = value_of(gm, b) if isinstance(b, fx.Node) else None
        if not (isinstance(vb, torch.Tensor) and vb.dim() == 1):
            return None  # a 2-D "bias" is not a linear's
    else:
        return None
    stored = _stored_weight(gm, wt)
    if stored is None or not isinstance(a, fx.Node):
        return None
    lin = _aten_mm(gm, node, name, a, b, stored)
    if lin.cast is not None and (lin.scale is None or lin.scale.op not in ("placeholder", "get_attr")):  # type: ignore[union-attr]
        # Scales computed per call (torchao's cast and flatten of its [N, 1]
        # scale), or none per channel: the form that concatenates the stored
        # scales, or says why not (one per tensor).
        return as_quantized_linear(gm, node, cast_only=True) or lin
    return lin


def _aten_mm(gm: fx.GraphModule, node: fx.Node, name: str, a: fx.Node, b: Optional[fx.Node], stored: tuple) -> Linear:
    w, dtype, dead = stored
    # Siblings each view the same source: group by the source.
    x = a.args[0] if a.op == "call_function" and a.target in _VIEWS and isinstance(a.args[0], fx.Node) else a
    dead = (*dead, a) if x is not a else dead
    if dtype is None:
        return Linear(node, x, w, b, name, dead=dead)
    out = _output_view(gm, node, value_of(gm, w).shape[0]) or node
    return _dequantized(gm, node, out, x, w, b, dtype, dead, name)


def _dequantized(gm: fx.GraphModule, gemm: fx.Node, out: fx.Node, x: fx.Node, w: fx.Node, b: Optional[fx.Node],
                 dtype: torch.dtype, dead: tuple, name: str) -> Linear:
    """A GEMM over ``w.to(dtype)``: with its bias inside, or followed (from
    `out`, the GEMM or its view back) by per-channel scales and maybe a bias,
    found as at the torch level."""
    v = value_of(gm, w)
    found = scaled(gm, out, v.shape[0]) if b is None and v.dim() == 2 else None
    if found is None:
        return Linear(gemm, x, w, b, name, dead=dead, cast=dtype)
    result, s, b, more = found
    return Linear(result, x, w, b, name, reads=gemm, dead=(*dead, gemm, *more), cast=dtype, scale=s)


def is_aten_group(members: list[Linear]) -> bool:
    return isinstance(members[0].node.target, torch._ops.OpOverload)


def emit_cast(graph: fx.Graph, member: Linear, weight: fx.Node) -> fx.Node:
    """`weight` cast the way `member` casts its own (the same op: prims for
    Inductor, aten.to or aten._to_copy for export)."""
    own = next(n for n in member.dead if _cast_of(n) is not None)
    return graph.call_function(own.target, (weight, *own.args[1:]), dict(own.kwargs))


def emit_aten(graph: fx.Graph, members: list[Linear], x: fx.Node, weight: fx.Node,
              bias: Optional[fx.Node], width: int) -> list[fx.Node]:
    """Insert the fused GEMM (at the graph's insert point) in the members'
    dialect; return it, followed by the view back to the members' leading dims
    when theirs had one (mm/addmm of a 3-D input, then scales)."""
    ref = members[0]
    gemm = ref.reads
    assert gemm is not None
    if gemm.target is aten.linear.default:
        return [graph.call_function(aten.linear.default, (x, weight, bias))]
    a = gemm.args[1] if gemm.target is aten.addmm.default else gemm.args[0]  # the member's view of x
    wt = graph.call_function(aten.permute.default, (weight, [1, 0]))
    if bias is None:
        fused = graph.call_function(aten.mm.default, (a, wt))
    else:
        fused = graph.call_function(aten.addmm.default, (bias, a, wt))
    # A scaled member's GEMM has one user: the view `_output_view` accepted, or the multiply.
    view = next(iter(gemm.users)) if gemm is not ref.node else None
    if view is None or view.target not in _VIEWS:
        return [fused]
    shape = [*view.args[1][:-1], width]  # type: ignore[index]
    return [fused, graph.call_function(view.target, (fused, shape))]
