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
from torch.fx.node import map_arg

from .match import Group, Operand, value_of

__all__ = ["fuse_group", "SPLIT_SIZES_KEY"]

# The fused GEMM node records its split sizes here, so later passes (tensor
# parallelism, export) can cut the fused weight apart again.
SPLIT_SIZES_KEY = "fxfuse_split_sizes"
_COPIED_META = ("stack_trace", "nn_module_stack", "source_fn_stack")


def _value_key(group: Group) -> Optional[str]:
    meta = group.members[0].node.meta
    return next((k for k in ("val", "example_value") if k in meta), None)


def _fake_value(gm: fx.GraphModule, node: fx.Node, key: str) -> Any:
    """Run `node` on its inputs' fake values, or None if any is unknown."""
    def value(n: fx.Node) -> Any:
        return value_of(gm, n) if n.op == "get_attr" else n.meta.get(key)

    args = map_arg(node.args, value)
    kwargs = map_arg(node.kwargs, value)
    vals = [value(n) for n in node.all_input_nodes]
    if any(v is None for v in vals):
        return None
    # The mode of the values themselves: Dynamo hands backends a graph whose
    # example values belong to its own mode, not the tracing context's.
    fakes = [v for v in vals if isinstance(v, FakeTensor)]
    if not fakes:
        return None
    fake_mode = fakes[0].fake_mode

    def fake(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and not isinstance(v, FakeTensor):
            return fake_mode.from_tensor(v)
        return v

    args = torch.utils._pytree.tree_map(fake, args)
    kwargs = torch.utils._pytree.tree_map(fake, kwargs)
    with fake_mode:
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        return node.target(*args, **kwargs)  # type: ignore[operator]


def _operand_node(graph: fx.Graph, op: Operand) -> fx.Node:
    return graph.get_attr(op) if isinstance(op, str) else op


def fuse_group(
    gm: fx.GraphModule,
    group: Group,
    anchor: fx.Node,
    fused_weight: Optional[fx.Node] = None,
    fused_bias: Optional[fx.Node] = None,
    rerouted: Optional[list[tuple[fx.Node, fx.Node]]] = None,
) -> fx.Node:
    """Insert the fused GEMM before `anchor` and reroute every member's users.

    The member nodes are left in place without users; the caller erases them
    once every group is rewritten (an anchor may be another group's member).
    Each (member, replacement) pair is logged in `rerouted` before its users
    move, so a failure can be undone. Returns the fused linear node.
    """
    graph = gm.graph
    members = group.members
    key = _value_key(group)
    new: list[fx.Node] = []
    with graph.inserting_before(anchor):
        weight = fused_weight
        bias = fused_bias
        if weight is None:
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
        parts = graph.call_function(torch.split, (fused, list(group.widths)), {"dim": -1})
        outs = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(members))]
    new += [fused, parts]
    fused.meta[SPLIT_SIZES_KEY] = list(group.widths)
    for n in new:
        for k in _COPIED_META:
            if k in members[0].node.meta:
                n.meta.setdefault(k, members[0].node.meta[k])
        if key is not None:
            val = _fake_value(gm, n, key)
            if val is not None:
                n.meta[key] = val
    for m, out in zip(members, outs):
        out.meta.update(m.node.meta)  # each piece keeps its member's value and trace
        if rerouted is not None:
            rerouted.append((m.node, out))
        m.node.replace_all_uses_with(out)
    return fused
