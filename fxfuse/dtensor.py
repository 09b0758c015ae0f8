"""Tensor-parallel (DTensor) models: fuse each rank's local sibling GEMMs.

With ``ColwiseParallel`` on q/k/v (or w1/w3), Dynamo's graph holds, per
projection, the DTensor round trip the parallel style wrote:

    xd = DTensor.from_local(x, mesh, [Replicate()])   # x: this rank's tensor
    y  = linear(xd, wq, bq)                             # wq, bq: Shard(0) DTensors
    y  = y.redistribute(placements=[Shard(-1)])         # already Shard(-1): no-op
    q  = y.to_local()

A replicated input times a row-sharded weight needs no communication: each
rank multiplies by its own rows, so the same computation on local tensors is

    q = linear(x, wq.to_local(), bq.to_local())

`localize` rewrites sibling calls (the same x, on the same mesh) into that
form before matching, so the usual pass fuses them over their *local* shards
(local widths, no collective added or removed); `restore` puts back the
DTensor form of every call the pass did not fuse, so a refused group leaves
the graph as it was. Shards of a fused group move into one local storage like
any weight (inputs.py reads a DTensor argument's local tensor).

Only when the input needs no gradient: the backward of ``from_local`` sums
the input's gradient over ranks (its partial sums become Replicate), which
the local form would drop.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import fx

__all__ = ["Localized", "is_dtensor", "local_value", "localize", "repoint", "restore"]

LINEARS = (torch._C._nn.linear, torch.nn.functional.linear)


@functools.lru_cache(maxsize=None)
def _dtensor_type() -> Optional[type]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def local_value(t: object) -> object:
    """A DTensor argument's local tensor (the object whose storage fxfuse
    moves); any other value as it is."""
    return t._local_tensor if is_dtensor(t) else t  # type: ignore[attr-defined]


@dataclass
class Localized:
    """One call rewritten to its local form, and what restores it."""

    chain: list[tuple]  # (node, op, target, args, kwargs, meta, prev) of from_local .. to_local
    linear: fx.Node  # the local linear that replaced the chain
    operands: list[fx.Node]  # its to_local() of the weight (and bias)


def _val(n: object) -> object:
    return n.meta.get("example_value", n.meta.get("val")) if isinstance(n, fx.Node) else None


def _placements(v: object, dt: type) -> Optional[tuple]:
    return tuple(v.placements) if isinstance(v, dt) else None  # type: ignore[attr-defined]


def _is_call(n: Optional[fx.Node], method: str) -> bool:
    """Is `n` ``x.<method>()``? Dynamo writes it as a method call, or (older
    versions) as a function named ``prim_<method>`` (``prim from_local``)
    with the non-tensor arguments baked in."""
    if n is None:
        return False
    if n.op == "call_method":
        return n.target == method
    spellings = {f"prim_{method}", f"prim {method}"} | ({"from_local"} if method == "from_local" else set())
    return n.op == "call_function" and getattr(n.target, "__name__", "") in spellings


def _only_user(n: fx.Node) -> Optional[fx.Node]:
    return next(iter(n.users)) if len(n.users) == 1 else None


def _colwise_chain(node: fx.Node, dt: type) -> Optional[list[fx.Node]]:
    """[from_local, linear, (redistribute,) to_local] if `node` is a colwise
    projection of a replicated plain tensor, else None."""
    from torch.distributed.tensor import Replicate, Shard

    if node.op != "call_function" or node.target not in LINEARS or node.kwargs:
        return None
    xd, w, *rest = node.args
    b = rest[0] if rest else None
    vx, vw, vb, vy = _val(xd), _val(w), _val(b), _val(node)
    if not (isinstance(xd, fx.Node) and _is_call(xd, "from_local")):
        return None
    x = xd.args[0] if xd.args else None
    if not isinstance(_val(x), torch.Tensor) or isinstance(_val(x), dt) or len(xd.users) != 1:
        return None
    if _placements(vx, dt) != (Replicate(),) or _placements(vw, dt) != (Shard(0),):
        return None
    if vw.dim() != 2 or (b is not None and _placements(vb, dt) != (Shard(0),)):  # type: ignore[union-attr]
        return None
    if vw.device_mesh != vx.device_mesh or (b is not None and vb.device_mesh != vx.device_mesh):  # type: ignore[union-attr]
        return None
    # The output must be sharded on its last dim: DTensor picks another
    # placement (all-gathering the weight) when a shard would be empty.
    if not isinstance(vy, torch.Tensor) or _placements(vy, dt) != (Shard(vy.dim() - 1),):
        return None
    chain = [xd, node]
    user = _only_user(node)
    # A redistribute to the placements the output already has moves nothing.
    if _is_call(user, "redistribute"):
        if _placements(_val(user), dt) != _placements(vy, dt):
            return None
        chain.append(user)
        user = _only_user(user)
    if not _is_call(user, "to_local") or len(user.args) != 1 or user.kwargs:
        return None
    return chain + [user]


def _local_node(graph: fx.Graph, operand: fx.Node) -> fx.Node:
    node = graph.call_method("to_local", (operand,))
    node.meta["example_value"] = _val(operand)._local_tensor  # type: ignore[union-attr]
    return node


def localize(gm: fx.GraphModule) -> tuple[list[Localized], int]:
    """Rewrite colwise sibling calls of DTensor graphs to their local form.
    Returns the localized calls and the number of sibling calls left alone
    because their input needs a gradient (whether or not this graph will
    run with autograd: a bare graph does not say)."""
    dt = _dtensor_type()
    if dt is None or not any(isinstance(_val(n), dt) for n in gm.graph.find_nodes(op="placeholder")):
        return [], 0
    chains: dict[tuple, list[list[fx.Node]]] = {}
    for node in gm.graph.nodes:
        chain = _colwise_chain(node, dt)
        if chain is not None:
            chains.setdefault((chain[0].args[0], _val(chain[0]).device_mesh), []).append(chain)  # type: ignore[union-attr]
    done: list[Localized] = []
    refused = 0
    local_of: dict[fx.Node, fx.Node] = {}  # one to_local() per weight: repeats stay repeats
    for (x, _), group in chains.items():
        if len(group) < 2:
            continue  # nothing to fuse it with: leave it alone
        if _val(x).requires_grad:  # type: ignore[union-attr]
            refused += len(group)
            continue
        done += [_localize_chain(gm.graph, chain, local_of) for chain in group]
    if done:
        gm.recompile()
    return done, refused


def _localize_chain(graph: fx.Graph, chain: list[fx.Node], local_of: dict[fx.Node, fx.Node]) -> Localized:
    xd, lin, out = chain[0], chain[1], chain[-1]
    # Each node and the node before it: `restore` puts it back in its place.
    saved = [(n, n.op, n.target, n.args, n.kwargs, n.meta, n.prev) for n in chain]
    # The local weights go after the placeholders, so that they do not limit
    # where the fused GEMM can be placed (before any member's first user).
    first = next(n for n in graph.nodes if n.op != "placeholder")
    operands = []
    for o in lin.args[1:]:
        if o is not None:
            if o not in local_of:
                with graph.inserting_before(first if o.op == "placeholder" else lin):
                    local_of[o] = _local_node(graph, o)
            operands.append(local_of[o])
    with graph.inserting_before(lin):
        new = graph.call_function(lin.target, (xd.args[0], *operands))
    new.meta = {**lin.meta, "example_value": _val(out)}
    out.replace_all_uses_with(new)
    for n in reversed(chain):
        graph.erase_node(n)
    return Localized(saved, new, operands)


def restore(gm: fx.GraphModule, localized: list[Localized]) -> int:
    """Put back the DTensor form of each localized call still in the graph
    (not fused), each node after the node that preceded it; drop the
    to_local() nodes nothing reads. Returns how many calls were put back."""
    graph = gm.graph
    alive = set(graph.nodes)
    env: dict[fx.Node, fx.Node] = {}  # erased chain node (or local linear) -> its new copy
    back: list[tuple[Localized, list[fx.Node]]] = []
    for loc in localized:
        if loc.linear not in alive:
            continue  # fused
        copies = []
        for old, op, target, args, kwargs, meta, prev in loc.chain:
            args, kwargs = fx.map_arg((args, kwargs), lambda n: env.get(n, n))
            prev = env.get(prev, prev)
            # Where it was, unless the node before it went (fused away).
            where = graph.inserting_after(prev) if prev in alive or prev in env.values() \
                else graph.inserting_before(loc.linear)
            with where:
                env[old] = graph.create_node(op, target, args, kwargs, old.name)
            env[old].meta = meta
            copies.append(env[old])
        loc.linear.replace_all_uses_with(copies[-1])
        env[loc.linear] = copies[-1]  # its place, for a call saved as coming after it
        back.append((loc, copies))
    if not _in_order(graph):
        # Old neighbours were fused away in between: each call goes back in
        # one piece where its local linear is, which is always in order.
        for loc, copies in back:
            for node in copies:
                loc.linear.prepend(node)
    for loc, _ in back:
        graph.erase_node(loc.linear)
    for op in {op: None for loc in localized for op in loc.operands}:
        if op in alive and not op.users:
            graph.erase_node(op)
    if localized:
        gm.recompile()
    return len(back)


def _in_order(graph: fx.Graph) -> bool:
    seen: set[fx.Node] = set()
    for node in graph.nodes:
        if any(a not in seen for a in node.all_input_nodes):
            return False
        seen.add(node)
    return True


def is_dtensor(t: object) -> bool:
    dt = _dtensor_type()
    return dt is not None and isinstance(t, dt)


def repoint(member: object, piece: torch.Tensor) -> bool:
    """Make the DTensor `member` hold `piece` as its local tensor, keeping the
    object (a Parameter stays the optimizer's, with its attributes and .grad).
    False, and nothing done, where autograd hooks are registered on it: they
    live in the part of the tensor that is swapped.

    Setting ``_local_tensor`` (or its ``.data``) alone would leave the
    wrapper's storage offset at the old one, and Dynamo then fails to fake
    the parameter on its next trace. So a wrapper is built around `piece`
    and its TensorImpl swapped in, as ``torch.utils.swap_tensors`` does;
    that function refuses tensors with weak references, which Dynamo keeps
    to every parameter it traced, although the swap keeps the Python object
    they point to.
    """
    dt = _dtensor_type()
    assert dt is not None and isinstance(member, dt)
    if getattr(member, "_backward_hooks", None) or getattr(member, "_post_accumulate_grad_hooks", None):
        return False
    grad = member.grad
    new = dt.from_local(piece, member.device_mesh, member.placements, run_check=False,
                        shape=member.shape, stride=member.stride())
    if member.__dict__.get("_is_param"):
        new = torch.nn.Parameter(new, requires_grad=member.requires_grad)
    torch._C._swap_tensor_impl(member, new)
    for slot in ("_local_tensor", "_spec"):
        mine, theirs = getattr(member, slot), getattr(new, slot)
        setattr(member, slot, theirs)
        setattr(new, slot, mine)
    if grad is not None:
        member.grad = grad
    return True
