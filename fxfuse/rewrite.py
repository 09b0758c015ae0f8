"""Graph surgery for one group: no decisions are taken here.

    q = linear(x, wq, bq); k = linear(x, wk, None)
becomes
    w = cat([wq, wk]); b = cat([bq, wk.new_zeros(nk)])
    qk = linear(x, w, b); parts = split(qk, [nq, nk], -1)
    q = parts[0]; k = parts[1]

unless the caller passes the fused weight (and bias) nodes itself, as the
backend does when the weights already live in one storage.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor

from .match import Group, Operand, value_of

__all__ = ["fuse_group", "Rerouted", "SPLIT_SIZES_KEY"]

# (replaced node, its replacement, the users moved): enough to undo exactly.
Rerouted = tuple[fx.Node, fx.Node, list[fx.Node]]

# The fused GEMM node records its split sizes here, so later passes (tensor
# parallelism, export) can cut the fused weight apart again.
SPLIT_SIZES_KEY = "fxfuse_split_sizes"
_COPIED_META = ("stack_trace", "nn_module_stack", "source_fn_stack")


def _value_key(group: Group) -> Optional[str]:
    meta = group.members[0].node.meta
    return next((k for k in ("val", "example_value") if k in meta), None)


def _new_value(gm: fx.GraphModule, node: fx.Node, key: str) -> Any:
    """Fake value of a weight-side node (``cat``, ``new_zeros``, ``to``),
    built from its inputs' shapes; None if an input has no fake value (e.g. a
    symbolic_trace graph)."""
    inputs = [value_of(gm, n) if n.op == "get_attr" else n.meta.get(key) for n in node.all_input_nodes]
    fakes = [v for v in inputs if isinstance(v, FakeTensor)]
    if not fakes or len(fakes) != len(inputs):
        return None
    ref = fakes[0]
    dtype = node.kwargs.get("dtype") or ref.dtype
    if node.target == "new_zeros":
        shape: tuple = tuple(node.args[1])  # type: ignore[arg-type]
    elif node.target == "to":
        shape = tuple(ref.shape)
    else:
        shape = (sum(v.shape[0] for v in fakes), *ref.shape[1:])
    return _fake_empty(ref, shape, dtype)[0]  # type: ignore[arg-type]


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
    rerouted: Optional[list[Rerouted]] = None,
) -> fx.Node:
    """Insert the fused GEMM before `anchor` and reroute every member's users.

    `given` maps "weight" / "bias" / "scale" to nodes that already hold the
    fused tensor (the backend's storages); anything not given is concatenated
    in the graph. For dequantized members (``linear(x, w.to(dt)) * s + b``)
    the stored weights and the scales are concatenated, then cast, multiplied
    and biased once.

    The member nodes are left in place without users; the caller erases them
    once every group is rewritten (an anchor may be another group's member).
    Each move of users is logged in `rerouted` before it happens, so a
    failure can be undone. Exact duplicates get their original's piece; a
    group of one distinct member needs no concatenation and no split.
    Returns the fused linear node.
    """
    graph = gm.graph
    members, ref = group.members, group.members[0]
    key = _value_key(group)
    given = given or {}
    new: list[fx.Node] = []  # weight-side nodes, given fake values below
    out_dtype = ref.cast or getattr(value_of(gm, ref.weight), "dtype", None)

    def stacked(kind: str) -> Optional[fx.Node]:
        if kind in given:
            return given[kind]
        ops = [getattr(m, kind) for m in members]
        if all(o is None for o in ops):
            return None
        if len(members) == 1:
            return _operand_node(graph, ops[0])
        nodes = []
        for m, o, n in zip(members, ops, group.widths):
            if o is None:  # a missing bias counts as zeros of that member's width
                w = _operand_node(graph, m.weight)
                nodes.append(graph.call_method("new_zeros", (w, (n,)), {"dtype": out_dtype}))
                new.append(nodes[-1])
            else:
                nodes.append(_operand_node(graph, o))
        new.append(graph.call_function(torch.cat, (nodes,), {"dim": 0}))
        return new[-1]

    with graph.inserting_before(anchor):
        weight, bias, scale = stacked("weight"), stacked("bias"), stacked("scale")
        if ref.cast is not None:
            weight = graph.call_method("to", (weight,), {"dtype": ref.cast})
            new.append(weight)
        fused = graph.call_function(torch._C._nn.linear, (group.input, weight, bias if scale is None else None))
        out, after = fused, []
        if scale is not None:
            out = graph.call_function(operator.mul, (out, scale))
            after.append(out)
            if bias is not None:
                out = graph.call_function(operator.add, (out, bias))
                after.append(out)
        if len(members) > 1:
            parts = graph.call_function(torch.split, (out, list(group.widths)), {"dim": -1})
            outs = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(members))]
        else:
            parts, outs = None, [out]
    fused.meta[SPLIT_SIZES_KEY] = list(group.widths)
    for n in new + [fused] + after + ([parts] if parts is not None else []):
        for k in _COPIED_META:
            if k in ref.node.meta:
                n.meta.setdefault(k, ref.node.meta[k])
    if key is not None:
        for n in new:  # weight-side concatenations and casts: cheap to evaluate
            if (val := _new_value(gm, n, key)) is not None:
                n.meta[key] = val
        _set_output_values(group, key, [fused, *after], parts, outs)
    for m, piece in list(zip(members, outs)) + [(d, outs[i]) for d, i in group.duplicates]:
        users = list(m.node.users)
        if rerouted is not None:
            rerouted.append((m.node, piece, users))
        m.node.replace_all_uses_with(piece)
    return fused


def _set_output_values(
    group: Group, key: str, chain: list[fx.Node], parts: Optional[fx.Node], outs: list[fx.Node]
) -> None:
    """Fake values of the fused output chain and of its split pieces.

    Built from the members' own output values rather than by running linear
    under the fake mode, which costs about a millisecond a group.
    """
    vals = [m.node.meta.get(key) for m in group.members]
    for m, out in zip(group.members, outs):
        if out.op == "call_function" and out.target is operator.getitem:
            out.meta.update(m.node.meta)  # each piece keeps its member's trace
    if not all(isinstance(v, FakeTensor) for v in vals):
        return
    ref = vals[0]
    shape = (*ref.shape[:-1], sum(group.widths))
    for n in chain:
        n.meta[key] = _fake_empty(ref, shape, ref.dtype)[0]
    if parts is None:  # one distinct member: its output is the chain's end
        return
    _, *pieces = _fake_empty(ref, shape, ref.dtype, list(group.widths))  # strided views, as at run time
    parts.meta[key] = tuple(pieces)
    for out, piece in zip(outs, pieces):
        out.meta[key] = piece
