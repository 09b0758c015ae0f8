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
    """Fake value of a weight or bias concatenation (``cat`` or ``new_zeros``),
    built from its inputs' shapes; None if an input has no fake value (e.g. a
    symbolic_trace graph)."""
    inputs = [value_of(gm, n) if n.op == "get_attr" else n.meta.get(key) for n in node.all_input_nodes]
    fakes = [v for v in inputs if isinstance(v, FakeTensor)]
    if not fakes or len(fakes) != len(inputs):
        return None
    ref = fakes[0]
    if node.target == "new_zeros":
        shape: tuple = tuple(node.args[1])  # type: ignore[arg-type]
    else:
        shape = (sum(v.shape[0] for v in fakes), *ref.shape[1:])
    return _fake_empty(ref, shape, ref.dtype)[0]


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


def _output_values(group: Group, key: str) -> Optional[tuple[Any, list[Any]]]:
    """Fake values of the fused output and of its split pieces.

    Built from the members' own output values rather than by running linear
    under the fake mode, which costs about a millisecond a group.
    """
    outs = [m.node.meta.get(key) for m in group.members]
    if not all(isinstance(v, FakeTensor) for v in outs):
        return None
    ref = outs[0]
    shape = (*ref.shape[:-1], sum(group.widths))
    fused, *pieces = _fake_empty(ref, shape, ref.dtype, list(group.widths))  # pieces: strided views
    return fused, pieces


def _operand_node(graph: fx.Graph, op: Operand) -> fx.Node:
    return graph.get_attr(op) if isinstance(op, str) else op


def fuse_group(
    gm: fx.GraphModule,
    group: Group,
    anchor: fx.Node,
    fused_weight: Optional[fx.Node] = None,
    fused_bias: Optional[fx.Node] = None,
    rerouted: Optional[list[Rerouted]] = None,
) -> fx.Node:
    """Insert the fused GEMM before `anchor` and reroute every member's users.

    The member nodes are left in place without users; the caller erases them
    once every group is rewritten (an anchor may be another group's member).
    Each move of users is logged in `rerouted` before it happens, so a
    failure can be undone. Exact duplicates get their original's piece; a
    group of one distinct member needs no concatenation and no split.
    Returns the fused linear node.
    """
    graph = gm.graph
    members = group.members
    key = _value_key(group)
    new: list[fx.Node] = []
    with graph.inserting_before(anchor):
        weight = fused_weight
        bias = fused_bias
        if weight is None and len(members) == 1:
            weight = _operand_node(graph, members[0].weight)
            bias = None if members[0].bias is None else _operand_node(graph, members[0].bias)
        elif weight is None:
            ws = [_operand_node(graph, m.weight) for m in members]
            weight = graph.call_function(torch.cat, (ws,), {"dim": 0})
            new.append(weight)
            if any(m.bias is not None for m in members):
                # A missing bias counts as zeros of that member's width.
                bs = []
                for m, w, n in zip(members, ws, group.widths):
                    if m.bias is not None:
                        bs.append(_operand_node(graph, m.bias))
                    else:
                        bs.append(graph.call_method("new_zeros", (w, (n,))))
                        new.append(bs[-1])
                bias = graph.call_function(torch.cat, (bs,), {"dim": 0})
                new.append(bias)
        fused = graph.call_function(torch._C._nn.linear, (group.input, weight, bias))
        if len(members) > 1:
            parts = graph.call_function(torch.split, (fused, list(group.widths)), {"dim": -1})
            outs = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(members))]
        else:
            parts, outs = None, [fused]
    fused.meta[SPLIT_SIZES_KEY] = list(group.widths)
    for n in new + [fused] + ([parts] if parts is not None else []):
        for k in _COPIED_META:
            if k in members[0].node.meta:
                n.meta.setdefault(k, members[0].node.meta[k])
    for n in new:  # weight and bias concatenations: small, cheap to evaluate
        if key is not None and (val := _new_value(gm, n, key)) is not None:
            n.meta[key] = val
    pieces = _output_values(group, key) if key is not None and parts is not None else None
    for i, (m, out) in enumerate(zip(members, outs)):
        if out is not fused:
            out.meta.update(m.node.meta)  # each piece keeps its member's trace
        elif key is not None and key in m.node.meta:
            out.meta[key] = m.node.meta[key]
        if pieces is not None:
            out.meta[key] = pieces[1][i]
    if pieces is not None and parts is not None:
        fused.meta[key], parts.meta[key] = pieces[0], tuple(pieces[1])
    for m, out in list(zip(members, outs)) + [(d, outs[i]) for d, i in group.duplicates]:
        users = list(m.node.users)
        if rerouted is not None:
            rerouted.append((m.node, out, users))
        m.node.replace_all_uses_with(out)
    return fused
