"""A rewrite that completes, or leaves the graph exactly as it was.

The pass rewrites in three phases, and only the last one destroys anything:

  1. add: new nodes (fused weights, the GEMM, the split, copies) are inserted;
     nothing existing is touched;
  2. reroute: the users of each member move to its piece (their args change);
  3. erase: the replaced members, and what only served them, are erased,
     after checking that nothing outside that set still reads them. This is
     the commit: erasing a node nothing reads cannot fail, and only code
     generation comes after it.

`Transaction` records, before phase 1, every node in order with its args and
kwargs, the module's attribute names, the part of ``gm.meta`` the pass uses,
and the weight source's state. `rollback` restores each recorded node's
inputs, erases every node it does not know (new nodes read only old nodes or
each other once those are restored), deletes new attributes and rolls the
weight source back: the graph has the same nodes, in the same order, with the
same inputs, so its code is byte-identical. No step has to log its own undo,
so a step added later cannot forget one.

`checkpoint(step)` marks each step of the rewrite by name (`STEPS`); it does
nothing, and the tests replace it with one that raises, to show that a failure
at any step is undone.
"""

from __future__ import annotations

from typing import Any, Iterable

from torch import fx

__all__ = ["Transaction", "STEPS", "checkpoint"]

# Every named point of a rewrite, in the order a group passes them.
STEPS = (
    "weights",   # the weight source has given (or added) the fused operands
    "concat",    # in-graph concatenations of weights, biases, scales
    "gemm",      # the fused GEMM (and its cast, scales, bias add)
    "split",     # the split and one getitem per member
    "values",    # fake values of the new nodes
    "reroute",   # after the first member's users moved to its piece
    "views",     # users that need a member's own layout read a copy
    "lint",      # after every group: the graph is checked
    "erase",     # the replaced members are about to be erased: the commit
)

# Keys of gm.meta the weight sources append to (see inductor.py).
_META_KEYS = ("fxfuse_dropped_constants",)


def checkpoint(step: str) -> None:
    """A named point of the rewrite (see STEPS). Does nothing."""


class Transaction:
    def __init__(self, gm: fx.GraphModule, source: Any = None) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.inputs = {n: (n.args, n.kwargs) for n in self.nodes}
        self.attrs = _attr_names(gm)
        self.meta = {k: list(gm.meta[k]) for k in _META_KEYS if k in gm.meta}
        self.source = source if hasattr(source, "snapshot") else None
        self.source_state = self.source.snapshot() if self.source is not None else None

    def erase(self, nodes: Iterable[fx.Node], helpers: Iterable[fx.Node] = ()) -> None:
        """Erase `nodes` (each must be read only by others of `nodes`), then
        the `helpers` that nothing reads any more. Raises before erasing
        anything if a node is still read: then a rollback is still complete."""
        graph = self.gm.graph
        doomed = set(nodes)
        for n in doomed:
            outside = [u for u in n.users if u not in doomed]
            if outside:
                raise RuntimeError(f"fxfuse: {n.name} is still read by {[u.name for u in outside]}")
        checkpoint("erase")
        optional = set(helpers) - doomed
        for node in reversed(graph.nodes):
            if node in doomed or (node in optional and not node.users):
                graph.erase_node(node)

    def rollback(self) -> None:
        graph = self.gm.graph
        known = set(self.nodes)
        for n, (args, kwargs) in self.inputs.items():
            if n.args is not args:
                n.args = args
            if n.kwargs is not kwargs:
                n.kwargs = kwargs
        new = [n for n in graph.nodes if n not in known]
        for n in new:  # cut them from each other first: any order of erasing works
            n.args, n.kwargs = (), {}
        for n in new:
            graph.erase_node(n)
        if list(graph.nodes) != self.nodes:
            for prev, n in zip(self.nodes, self.nodes[1:]):
                prev.append(n)
        for name in _attr_names(self.gm) - self.attrs:
            delattr(self.gm, name)
        for k in _META_KEYS:
            if k in self.meta:
                self.gm.meta[k] = self.meta[k]
            else:
                self.gm.meta.pop(k, None)
        if self.source is not None:
            self.source.rollback(self.source_state)
        self.gm.recompile()


def _attr_names(gm: fx.GraphModule) -> set[str]:
    return set(gm._parameters) | set(gm._buffers) | set(gm._modules) | {
        k for k in vars(gm) if not k.startswith("_")
    }
