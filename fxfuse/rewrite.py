"""Graph surgery for one group: no decisions are taken here.

    q = linear(x, wq, bq); k = linear(x, wk, None)
becomes
    w = cat([wq, wk]); b = cat([bq, wk.new_zeros(nk)])
    qk = linear(x, w, b); parts = split(qk, [nq, nk], -1)
    q = parts[0]; k = parts[1]

in the members' dialect: torch functions for Dynamo and symbolic_trace
graphs, aten ops for AOT and exported graphs (see aten.py). The caller may
pass the fused weight (bias, scales) nodes itself, as the backend does when
the weights already live in one storage.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Optional

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor

from . import legality, transaction
from .aten import emit_aten, emit_cast, is_aten_group
from .forms import Group, Operand, stored_operands, value_of
from .qforms import emit_form

__all__ = ["fuse_group", "SPLIT_SIZES_KEY"]

# The fused GEMM node records its split sizes here, so later passes (tensor
# parallelism, export) can cut the fused weight apart again.
SPLIT_SIZES_KEY = "fxfuse_split_sizes"
_COPIED_META = ("stack_trace", "nn_module_stack", "source_fn_stack")
aten = torch.ops.aten

# Ops per dialect: concatenate along dim 0, zeros of a width, the member's
# cast of a weight, the GEMM (with the view back to the members' leading dims
# in aten), the scales' multiply, the bias add, the split along the last dim.
_TORCH: dict[str, Callable[..., Any]] = {
    "cat": lambda g, ns: g.call_function(torch.cat, (ns,), {"dim": 0}),
    "zeros": lambda g, w, n, dt, dev: g.call_method("new_zeros", (w, (n,)), {"dtype": dt}),
    "cast": lambda g, m, w: g.call_method("to", (w,), {"dtype": m.cast}),
    "gemm": lambda g, ms, x, w, b, n: [g.call_function(torch._C._nn.linear, (x, w, b))],
    "mul": lambda g, y, s: g.call_function(operator.mul, (y, s)),
    "add": lambda g, y, b: g.call_function(operator.add, (y, b)),
    "split": lambda g, y, widths: g.call_function(torch.split, (y, widths), {"dim": -1}),
}
_ATEN: dict[str, Callable[..., Any]] = {
    "cat": lambda g, ns: g.call_function(aten.cat.default, (ns, 0)),
    # aten.full: Inductor lowers it (aten.new_zeros is decomposed before lowering).
    "zeros": lambda g, w, n, dt, dev: g.call_function(
        aten.full.default, ([n], 0), {"dtype": dt, "layout": torch.strided, "device": dev, "pin_memory": False}),
    "cast": emit_cast,
    "gemm": emit_aten,
    "mul": lambda g, y, s: g.call_function(aten.mul.Tensor, (y, s)),
    "add": lambda g, y, b: g.call_function(aten.add.Tensor, (y, b)),
    "split": lambda g, y, widths: g.call_function(aten.split_with_sizes.default, (y, widths, -1)),
}


def _value_key(group: Group) -> Optional[str]:
    meta = group.members[0].node.meta
    return next((k for k in ("val", "example_value") if k in meta), None)


def _fake_empty(ref: FakeTensor, shape: tuple, dtype: torch.dtype, split: Optional[list[int]] = None) -> list[Any]:
    """A fake tensor of `shape` in `ref`'s mode (and its pieces split along the
    last dim). With static shapes it is built from a meta tensor directly: a
    fake-mode dispatch per node would be most of the pass's time."""
    fm = ref.fake_mode
    if all(isinstance(d, int) for d in shape):
        conv = fm.fake_tensor_converter
        meta = torch.empty(shape, dtype=dtype, device="meta")
        parts = list(meta.split(split, dim=-1)) if split is not None else []
        return [conv.from_meta_and_device(fm, t, ref.device) for t in [meta, *parts]]
    with fm:
        out = torch.empty(shape, dtype=dtype, device=ref.device)
        return [out, *(out.split(split, dim=-1) if split is not None else [])]


def _operand_node(graph: fx.Graph, op: Operand) -> fx.Node:
    return graph.get_attr(op) if isinstance(op, str) else op


def fuse_group(
    gm: fx.GraphModule,
    group: Group,
    anchor: fx.Node,
    given: Optional[dict[str, fx.Node]] = None,
) -> dict[fx.Node, fx.Node]:
    """Insert the fused GEMM before `anchor` and reroute every member's users.

    `given` maps "weight" / "bias" / "scale" to nodes that already hold the
    fused tensor (the backend's storages); anything not given is concatenated
    in the graph. For dequantized members (``linear(x, w.to(dt)) * s + b``)
    the stored weights and the scales are concatenated, then cast, multiplied
    and biased once.

    The member nodes are left in place without users; the caller erases them
    once every group is rewritten (an anchor may be another group's member,
    and a later group may read a member's output: see `fuse.py`). Undo is
    the caller's (transaction.py): this only adds nodes and moves users.
    Exact duplicates get their original's piece; a group of one distinct
    member needs no concatenation and no split.
    Returns, for each member and duplicate, the node its users read now.
    """
    graph = gm.graph
    members, ref = group.members, group.members[0]
    key = _value_key(group)
    given = given or {}
    dialect = _ATEN if is_aten_group(members) else _TORCH
    w0 = value_of(gm, ref.weight)
    out_dtype = ref.cast or w0.dtype  # type: ignore[union-attr]
    k_dims = tuple(w0.shape[1:])  # type: ignore[union-attr]
    n_total = sum(group.widths)
    made: list[tuple[fx.Node, tuple, torch.dtype]] = []  # weight-side nodes: shape, dtype

    def stacked(kind: str) -> Optional[fx.Node]:
        if kind in given:
            return given[kind]
        ops = [stored_operands(m)[kind] for m in members]
        if all(o is None for o in ops):
            return None
        if len(members) == 1:
            return _operand_node(graph, ops[0])
        tail = tuple(value_of(gm, next(o for o in ops if o is not None)).shape[1:])  # type: ignore[union-attr]
        nodes, dtype = [], out_dtype
        for m, o, n in zip(members, ops, group.widths):
            if o is None:  # a missing bias counts as zeros of that member's width
                nodes.append(dialect["zeros"](graph, _operand_node(graph, m.weight), n, out_dtype, w0.device))
                made.append((nodes[-1], (n,), out_dtype))
            else:
                nodes.append(_operand_node(graph, o))
                dtype = getattr(value_of(gm, o), "dtype", dtype)
        cat = dialect["cat"](graph, nodes)
        made.append((cat, (n_total, *tail), dtype))
        return cat

    with graph.inserting_before(anchor):
        weight, bias, scale = stacked("weight"), stacked("bias"), stacked("scale")
        extra = {k: stacked(k) for k in stored_operands(ref) if k.startswith("extra_")}
        transaction.checkpoint("concat")
        if ref.form is not None:  # torchao's aten forms: the member's subgraph, once
            chain = emit_form(graph, ref, {"weight": weight, **extra}, n_total)  # type: ignore[dict-item]
        else:
            if ref.cast is not None:
                weight = dialect["cast"](graph, ref, weight)
                made.append((weight, (n_total, *k_dims), ref.cast))
            chain = dialect["gemm"](graph, members, group.input, weight, bias if scale is None else None, n_total)
        fused = chain[0]
        if scale is not None:  # dequantized: the scales, then the bias, apply to the GEMM's result
            chain.append(dialect["mul"](graph, chain[-1], scale))
            if bias is not None:
                chain.append(dialect["add"](graph, chain[-1], bias))
        transaction.checkpoint("gemm")
        parts, outs = None, [chain[-1]]
        if len(members) > 1:
            parts = dialect["split"](graph, chain[-1], list(group.widths))
            outs = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(members))]
    transaction.checkpoint("split")
    fused.meta[SPLIT_SIZES_KEY] = list(group.widths)
    new_nodes = [n for n, _, _ in made] + chain + ([parts] if parts is not None else [])
    new_nodes += [n for n in fused.all_input_nodes if n.op == "call_function" and not n.meta]  # aten permute
    for n in new_nodes:
        for k in _COPIED_META:
            if k in ref.node.meta:
                n.meta.setdefault(k, ref.node.meta[k])
    if key is not None:
        _set_values(gm, group, key, made, fused, chain, parts, outs)
    transaction.checkpoint("values")
    pairs = [(m, i) for i, m in enumerate(members)] + list(group.duplicates)
    # A piece that leaves the graph (returned, or handed on across a graph
    # break) must have the strides the member's own output had, since code
    # outside may ``.view(-1)`` it: its users read a contiguous copy. Decided
    # on the members' own values, before their users move.
    escaping = {i for m, i in pairs if legality.escapes(gm, m.node)} if parts is not None else set()
    copies = {i: _contiguous_copy(graph, outs[i], key, dialect is _ATEN) for i in sorted(escaping)}
    now_read: dict[fx.Node, fx.Node] = {}
    for m, i in pairs:
        now_read[m.node] = copies.get(i, outs[i])
        m.node.replace_all_uses_with(now_read[m.node])
        transaction.checkpoint("reroute")
    if parts is not None:
        for i, piece in enumerate(outs):
            if i not in escaping:
                _keep_layouts(gm, piece, key, dialect is _ATEN)
    transaction.checkpoint("views")
    return now_read


_VIEW_METHODS = ("view",)
_VIEW_OPS = (aten.view.default,)


def _keep_layouts(gm: fx.GraphModule, piece: fx.Node, key: Optional[str], is_aten: bool) -> None:
    """A piece is a column slice of the fused output, not contiguous like the
    member's own output was. Users that may depend on that layout read a
    contiguous copy instead (one copy per piece):
      * a ``view`` that needed contiguity (``.view(-1)``) would raise; the
        common views (splitting the last dim into heads) stay free;
      * an op outside PyTorch (a ``torch.library`` custom op, a user
        function or module the graph calls opaquely) may assume the strides
        eager gives it, as custom kernels often do."""
    val = piece.meta.get(key) if key else None
    copy: Optional[fx.Node] = None
    for user in list(piece.users):
        is_view = (user.op == "call_method" and user.target in _VIEW_METHODS) or (
            user.op == "call_function" and (user.target in _VIEW_OPS or user.target is torch.Tensor.view))
        if is_view and user.args[0] is piece:
            if isinstance(val, FakeTensor) and _view_ok(val, user.args[1:]):
                continue
        elif not _is_foreign(gm, user):
            continue
        copy = copy or _contiguous_copy(gm.graph, piece, key, is_aten)
        user.replace_input_with(piece, copy)


# Callables of these modules take any strides (PyTorch's own ops, Python's operators).
_OWN_MODULES = ("torch", "_operator", "operator", "math", "builtins")


def _is_foreign(gm: fx.GraphModule, user: fx.Node) -> bool:
    """Is `user` code from outside PyTorch, which may assume a contiguous input?"""
    t = user.target
    if user.op == "call_module":
        return not type(gm.get_submodule(str(t))).__module__.startswith("torch.")
    if user.op != "call_function":
        return False  # tensor methods, output
    if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return t.namespace not in ("aten", "prims")
    if isinstance(t, torch._ops.HigherOrderOperator):
        # Traced PyTorch code, unless it wraps a custom op (auto_functionalized).
        return any(isinstance(a, torch._ops.OpOverload) and a.namespace not in ("aten", "prims") for a in user.args)
    owner = getattr(t, "__objclass__", None)  # Tensor methods: torch.Tensor.view
    module = getattr(owner or t, "__module__", None) or ""
    return module.split(".")[0] not in _OWN_MODULES


def _contiguous_copy(graph: fx.Graph, piece: fx.Node, key: Optional[str], is_aten: bool) -> fx.Node:
    val = piece.meta.get(key) if key else None
    with graph.inserting_after(piece):
        if is_aten:
            copy = graph.call_function(aten.clone.default, (piece,), {"memory_format": torch.contiguous_format})
        else:
            copy = graph.call_method("contiguous", (piece,))
    copy.meta.update({k: v for k, v in piece.meta.items() if k in _COPIED_META})
    if isinstance(val, FakeTensor):
        copy.meta[key] = _fake_empty(val, tuple(val.shape), val.dtype)[0]  # type: ignore[index]
    return copy


def _view_ok(val: FakeTensor, shape_args: tuple) -> bool:
    shape = shape_args[0] if len(shape_args) == 1 and isinstance(shape_args[0], (list, tuple)) else shape_args
    if not all(isinstance(d, int) for d in (*shape, *val.shape, *val.stride())):
        return False  # symbolic: be safe
    # A meta tensor of the piece's layout, not the fake value itself: the fake
    # view accepts [2, 1, 2] with strides (5, 5, 1) -> (-1,), which the real
    # (and meta) view refuses.
    meta = torch.empty_strided(tuple(val.shape), tuple(val.stride()), dtype=val.dtype, device="meta")
    try:
        meta.view(*shape)
        return True
    except RuntimeError:  # the meta view refused: the real one would too
        return False


def _set_values(gm: fx.GraphModule, group: Group, key: str, made: list, fused: fx.Node,
                chain: list[fx.Node], parts: Optional[fx.Node], outs: list[fx.Node]) -> None:
    """Fake values for the new nodes, built from shapes the group already
    knows rather than by running the ops under the fake mode (which costs
    about a millisecond a group). The pieces are strided views, as at run time."""
    for m, out in zip(group.members, outs):
        if out.op == "call_function" and out.target is operator.getitem:
            out.meta.update(m.node.meta)  # each piece keeps its member's trace
    vals = [m.node.meta.get(key) for m in group.members]
    if not all(isinstance(v, FakeTensor) for v in vals):
        return
    ref = vals[0]
    for node, shape, dtype in made:
        node.meta[key] = _fake_empty(ref, shape, dtype)[0]
    for n in fused.all_input_nodes:  # aten: the permute of the fused weight
        if key not in n.meta and n.op == "call_function" and n.target is aten.permute.default:
            w = n.args[0].meta.get(key) if isinstance(n.args[0], fx.Node) else None
            if isinstance(w, torch.Tensor):
                n.meta[key] = _fake_empty(ref, (w.shape[1], w.shape[0]), w.dtype)[0]
    # The fused output has the members' leading dims (2-D for aten mm/addmm);
    # the GEMM those of the members' own GEMM (2-D before an aten view back).
    # A torchao form's copies have theirs already (qforms.emit_form).
    n_total = sum(group.widths)
    shape = (*ref.shape[:-1], n_total)
    if group.members[0].form is None:
        gemm = group.members[0].reads.meta.get(key)  # type: ignore[union-attr]
        gemm = gemm if isinstance(gemm, FakeTensor) else ref
        chain[0].meta[key] = _fake_empty(ref, (*gemm.shape[:-1], n_total), gemm.dtype)[0]
        for n in chain[1:]:
            n.meta[key] = _fake_empty(ref, shape, ref.dtype)[0]
    if parts is None:  # one distinct member: its output is the chain's end
        return
    _, *pieces = _fake_empty(ref, shape, ref.dtype, list(group.widths))
    parts.meta[key] = tuple(pieces) if parts.target is torch.split else list(pieces)
    for out, piece in zip(outs, pieces):
        out.meta[key] = piece
