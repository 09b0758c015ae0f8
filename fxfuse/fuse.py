"""Fuse sibling linears: the linear calls that read the same input become one
GEMM over their concatenated weights, followed by a split.

    q = linear(x, wq, bq)                 w  = cat([wq, wk, wv])
    k = linear(x, wk)             ==>     b  = cat([bq, zeros(nk), zeros(nv)])
    v = linear(x, wv)                     qkv = linear(x, w, b)
                                          q, k, v = split(qkv, [nq, nk, nv], -1)

Preconditions (each refusal is counted under its `Reason`):
  * the members read the same input node and have plain 2-D weights of one
    dtype, device and in_features, with static shapes; biases, if any, match;
  * no member depends on another member (a weight may be computed in the graph,
    but not from a sibling's output);
  * nothing writes in place to the input, a weight, a bias, or memory they may
    alias, between the fused GEMM's position and any member's;
  * a position exists after every operand and before any member's first user.

When it does not pay: the fused output keeps every member's result alive
until the split pieces die, so peak activation memory can grow by the other
members' outputs; and with ``weights="cat"`` the weights are re-copied on
every call, which at small batch costs more than the saved launches (the
backend's "storage" mode removes that copy, see weights.py).

Analysis (match + legality) runs on the untouched graph; the rewrite runs
after, and old nodes are erased only at the end. A group may read another
group's member output (``c = C(b); d = D(b)`` with b fused on x): it is
rewritten after that group and reads b's piece. If the rewrite fails, the
graph is put back exactly as it was (transaction.py) and the error is
reported, unless ``strict``.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace
from typing import Callable, Optional, Union

from torch import fx

from . import dtensor, legality, transaction
from .config import FuseConfig
from .cost import check as check_cost, decisions as gate_decisions
from .cse import share_producers
from .legality import Reason
from .match import Group, Linear, find_linears, siblings, value_of
from .report import FusedGroup, FuseReport
from .rewrite import fuse_group
from .transaction import Transaction

__all__ = ["fuse_linears", "plan"]

log = logging.getLogger(__name__)

# Given a group about to be rewritten, return the nodes (already in the graph)
# holding its fused "weight", "bias" and "scale"; None to concatenate them in
# the graph; or a Reason to leave the group alone.
WeightSource = Callable[[fx.GraphModule, Group], Union[dict[str, fx.Node], Reason, None]]


def _buckets(gm: fx.GraphModule, sibs: list[Linear]) -> list[list[Linear]]:
    """Split siblings into sets that can share a GEMM (same dtype, device, K)."""
    buckets: list[list[Linear]] = []
    for lin in sibs:
        for b in buckets:
            if legality.incompatibility(gm, b[0], lin) is None:
                b.append(lin)
                break
        else:
            buckets.append([lin])
    return buckets


def _place(
    gm: fx.GraphModule, members: list[Linear], order: dict[fx.Node, int], nodes: list[fx.Node]
) -> tuple[fx.Node, Optional[Reason]]:
    """Where the fused GEMM goes, or why it can go nowhere (graph walks)."""
    reason = legality.check_independent(members, order)
    if reason is not None:
        return nodes[0], reason
    anchor = legality.insertion_point(members, order, nodes)
    if anchor is None:
        return nodes[0], Reason.NO_LEGAL_POSITION
    return anchor, legality.check_no_mutation(gm, members, anchor, order, nodes)


def plan(
    gm: fx.GraphModule, config: FuseConfig, runs_with_grad: bool = False, grad_graph: bool = False
) -> tuple[list[tuple[Group, fx.Node]], Counter, int]:
    """Find the groups to fuse and where each goes. Does not touch the graph.

    `runs_with_grad`: the graph will run with autograd recording (the backend
    knows this from Dynamo; a bare graph does not), so `config.training` applies.
    `grad_graph`: the graph computes gradients itself (a joint graph), so every
    weight counts as needing one.

    Returns (groups with their insertion anchors, skipped calls by reason,
    number of linear calls).
    """
    # Inputs that are one pure computation repeated read as one (cse.py).
    linears, skipped = share_producers(gm, find_linears(gm))
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    accepted: list[tuple[Group, fx.Node]] = []
    written: Optional[tuple[set[fx.Node], set[int]]] = None
    live = legality.live_nodes(gm)

    def refuse(members: list[Linear], reason: Reason) -> None:
        skipped[reason.value] += len(members)
        log.debug("fxfuse: not fusing %s (input %s): %s", ", ".join(m.name for m in members),
                  members[0].input.name, reason.value)

    for sibs in siblings(linears):
        ok = []
        for lin in sibs:
            reason = legality.check_member(gm, lin, allow_grad=config.training or not runs_with_grad)
            if reason is None and grad_graph and not config.training:
                reason = Reason.NEEDS_GRAD
            if reason is None and lin.node not in live:
                # Dead code: nothing to gain, and autograd would see it (a zero
                # gradient where eager has none).
                reason = Reason.UNUSED_OUTPUT
            if reason is None and runs_with_grad and legality.leaves_graph(gm, lin):
                # Split pieces are views of one output; autograd forbids writing
                # them in place, and code after a graph break may.
                reason = Reason.OUTPUT_LEAVES_GRAPH
            if reason is None:
                ok.append(lin)
            else:
                refuse([lin], reason)
        buckets = _buckets(gm, ok)
        for bucket in buckets:
            groups = _chunks(gm, bucket, config.max_group_size)
            # A repeat of a call whose output the graph returns too stays its
            # own call: computed once, the caller would get one tensor twice.
            kept = {id(lin) for g in groups for lin in g.calls}
            left = [lin for lin in bucket if id(lin) not in kept]
            if left:
                refuse(left, Reason.DUPLICATE_OUTPUT_LEAVES_GRAPH)
            for group in groups:
                calls = group.calls
                if len(calls) < config.min_group_size:
                    # Too small because its siblings could not join it: say why.
                    other = next((b for b in buckets if b is not bucket), None)
                    why = legality.incompatibility(gm, other[0], calls[0]) if other else None
                    refuse(calls, why or Reason.BELOW_MIN_GROUP_SIZE)
                    continue
                # max_rows, then the predicted speedup of this group's own GEMMs.
                reason = check_cost(gm, calls, config)
                if reason is not None:
                    refuse(calls, reason)
                    continue
                anchor, reason = _place(gm, calls, order, nodes)
                if reason is None:
                    if written is None:  # the graph's in-place writes, found once
                        written = legality.written_nodes(gm, nodes)
                    reason = legality.check_outputs_not_written(gm, calls, written)
                if reason is None and config.should_fuse is not None and not config.should_fuse(group):
                    reason = Reason.VETOED
                if reason is not None:
                    refuse(calls, reason)
                    continue
                accepted.append((group, anchor))
    return accepted, skipped, len(linears)


def _chunks(gm: fx.GraphModule, bucket: list[Linear], cap: Optional[int]) -> list[Group]:
    """Groups of at most `cap` distinct members; an exact duplicate (same
    weight and bias) joins the group of the call it repeats, computed once."""
    unique: list[Linear] = []
    first: dict[tuple, int] = {}
    dups: list[tuple[Linear, int]] = []
    returned: set[tuple] = set()  # keys of which a kept call's result leaves the graph
    for lin in bucket:
        key = (lin.weight, lin.bias)
        leaves = legality.leaves_graph(gm, lin)
        if key in first and leaves and key in returned:
            continue  # returned twice, it would be one tensor twice (see plan)
        if leaves:
            returned.add(key)
        if key in first:
            dups.append((lin, first[key]))
        else:
            first[key] = len(unique)
            unique.append(lin)
    cap = cap or len(unique)
    groups = []
    for start in range(0, len(unique), cap):
        members = unique[start : start + cap]
        widths = [int(value_of(gm, m.weight).shape[0]) for m in members]  # type: ignore[union-attr]
        own = [(d, i - start) for d, i in dups if start <= i < start + cap]
        groups.append(Group(members[0].input, members, widths, own))
    return groups


def _fuse(
    gm: fx.GraphModule,
    config: FuseConfig,
    weight_source: Optional[WeightSource] = None,
    runs_with_grad: bool = False,
    grad_graph: bool = False,
) -> FuseReport:
    # Tensor-parallel graphs: sibling projections in their local form, and
    # back to the DTensor form for those that end up not fused.
    localized, needs_grad = dtensor.localize(gm)
    try:
        report = _fuse_local(gm, config, weight_source, runs_with_grad, grad_graph)
        report.gate = gate_decisions(gm)
    finally:
        dtensor.restore(gm, localized)
    if needs_grad:
        report.skipped[Reason.SHARDED_INPUT_NEEDS_GRAD.value] += needs_grad
    return report


def _fuse_local(
    gm: fx.GraphModule,
    config: FuseConfig,
    weight_source: Optional[WeightSource],
    runs_with_grad: bool,
    grad_graph: bool,
) -> FuseReport:
    groups, skipped, before = plan(gm, config, runs_with_grad, grad_graph)
    report = FuseReport(before=before, after=before, skipped=skipped, graphs=1)
    if not groups:
        return report
    tx = Transaction(gm, weight_source)
    fused_groups: list[FusedGroup] = []
    fused_calls: list[Linear] = []
    now_read: dict[fx.Node, fx.Node] = {}  # replaced member -> what its users read now
    try:
        for group, anchor in _producers_first(groups):
            group = _reading_current(group, now_read)
            given = weight_source(gm, group) if weight_source is not None else None
            if isinstance(given, Reason):
                report.skipped[given.value] += len(group.calls)
                continue
            transaction.checkpoint("weights")
            now_read.update(fuse_group(gm, group, anchor, given))
            fused_calls += group.calls
            fused_groups.append(FusedGroup(
                tuple(group.names),
                tuple(group.widths) + tuple(group.widths[i] for _, i in group.duplicates),
                tuple(m.bias is not None for m in group.calls),
                "storage" if given else "cat",
            ))
        transaction.checkpoint("lint")
        gm.graph.lint()
        # What only served the replaced calls (the matmul, the transpose) goes too.
        tx.erase([lin.node for lin in fused_calls], [n for lin in fused_calls for n in lin.dead])
    except Exception as e:  # noqa: BLE001 - any failure must leave the graph as it was
        tx.rollback()
        if config.strict:
            raise
        log.warning("fxfuse: rewrite failed, graph left unchanged: %r", e)
        report.errors.append(repr(e))
        report.skipped[Reason.ERROR.value] += sum(len(g.calls) for g, _ in groups)
        return report
    gm.recompile()
    report.groups = fused_groups
    report.after = len(find_linears(gm))
    return report


def _producers_first(groups: list[tuple[Group, fx.Node]]) -> list[tuple[Group, fx.Node]]:
    """The groups in plan order, except that a group whose input (or weight)
    is another group's member output comes after that group. Both may go
    before the same node (the first reader of the member), and the reader's
    GEMM must come after the piece it reads."""
    owner = {m.node: i for i, (g, _) in enumerate(groups) for m in g.calls}
    out: list[tuple[Group, fx.Node]] = []
    state: dict[int, bool] = {}  # group index -> done (False: on the stack)
    for root in range(len(groups)):
        stack = [root]
        while stack:
            i = stack[-1]
            if state.get(i) is None:
                state[i] = False
                g = groups[i][0]
                needs = {owner[n] for n in (g.input, *_nodes_of(g)) if n in owner}
                stack += [j for j in needs if j not in state]  # (a cycle cannot pass legality)
            else:
                stack.pop()
                if not state[i]:
                    state[i] = True
                    out.append(groups[i])
    return out


def _nodes_of(group: Group) -> list[fx.Node]:
    return [o for m in group.calls for o in m.operands if isinstance(o, fx.Node)]


def _reading_current(group: Group, now_read: dict[fx.Node, fx.Node]) -> Group:
    """`group` with its input and operands as they are now: a member output
    of a group fused before it is read through that group's piece."""
    if not now_read:
        return group

    def cur(o):
        while isinstance(o, fx.Node) and o in now_read:
            o = now_read[o]
        return o

    def lin(m: Linear) -> Linear:
        return replace(m, input=cur(m.input), weight=cur(m.weight), bias=cur(m.bias), scale=cur(m.scale))

    return Group(cur(group.input), [lin(m) for m in group.members], group.widths,
                 [(lin(d), i) for d, i in group.duplicates])


def fuse_linears(gm: fx.GraphModule, config: Optional[FuseConfig] = None, **options: object) -> FuseReport:
    """Fuse sibling linear calls of `gm` in place and report what was done.
    Options: a `FuseConfig`, or its fields by name (``min_group_size=3``).

    >>> import torch, fxfuse
    >>> class QKV(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.q, self.k, self.v = (torch.nn.Linear(8, n) for n in (8, 4, 4))
    ...     def forward(self, x):
    ...         return self.q(x), self.k(x), self.v(x)
    >>> gm = torch.fx.symbolic_trace(QKV())
    >>> fxfuse.fuse_linears(gm).removed
    2
    """
    if not isinstance(gm, fx.GraphModule):
        import torch

        hint = ('trace it first (gm = torch.fx.symbolic_trace(model)), or compile it with '
                'torch.compile(model, backend="fxfuse")' if isinstance(gm, torch.nn.Module)
                else "pass a torch.fx.GraphModule")
        raise TypeError(f"fuse_linears rewrites a torch.fx.GraphModule, got {type(gm).__name__}: {hint}")
    if config is not None and options:
        raise TypeError(f"fuse_linears takes a FuseConfig or keyword options, not both; got config and {sorted(options)}")
    if config is not None and not isinstance(config, FuseConfig):
        raise TypeError(f"config must be a FuseConfig, got {type(config).__name__}; "
                        "keyword options go by name: fuse_linears(gm, min_group_size=3)")
    report = _fuse(gm, config or FuseConfig.from_options(options))
    report.publish()
    return report
