"""Feed fused storages to a compiled Dynamo graph as extra inputs.

In a Dynamo graph the weights are placeholders whose real tensors arrive on
every call. For a group whose weights can live in one storage (see
weights.py), the fused GEMM reads a new placeholder instead of a
``torch.cat``, and the members' own placeholders are dropped (nothing else
reads them). The returned callable checks, by data pointer, that every member
still lives in its slice (re-fusing first if not), then calls the compiled
graph with the kept arguments and the fused tensors. The new placeholders are
marked as static inputs, so CUDA graphs read them in place instead of copying
them per replay; dropping the members also means fewer inputs to check.

torchao int4 weights keep their scales with the output channels in dim 1,
which no row view can share: the graph takes each member's scale tensor as
one more static input and joins them itself (quantized.with_columns).

The rewrite happens on a copy of Dynamo's graph: Dynamo maps the placeholders
of its own graph back to the frame's values after the backend returns.
"""

from __future__ import annotations

import copy
import operator
import weakref
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, fx
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

from . import guards, quantized, weights
from .legality import Reason, check_per_call_concat
from .forms import Group, Operand
from .weights import Storage, concat_rows, storage_for

__all__ = ["FusedInputs", "copy_graph_module"]


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of a Dynamo graph module that can be rewritten freely."""
    from torch.fx._lazy_graph_module import _LazyGraphModule

    graph = copy.deepcopy(gm.graph)  # node meta is copied shallowly
    # Dynamo's graph modules generate their Python code lazily, on first call;
    # keep that, or every rewrite would pay for a code generation up front.
    cls = _LazyGraphModule if isinstance(gm, _LazyGraphModule) else fx.GraphModule
    new = cls(gm, graph, gm.__class__.__name__)
    new.meta = dict(gm.meta)
    # What Dynamo attaches besides the graph; AOTAutograd reads
    # _param_name_to_source to find the static inputs (parameters, buffers,
    # the KV cache) that CUDA graphs may read in place and mutate.
    for attr in ("_param_name_to_source", "_source_to_user_stacks", "_backend_id"):
        if hasattr(gm, attr):
            setattr(new, attr, getattr(gm, attr))
    for old, node in zip(gm.graph.find_nodes(op="placeholder"), graph.find_nodes(op="placeholder")):
        if hasattr(old, "_dynamo_source"):
            node._dynamo_source = old._dynamo_source  # type: ignore[attr-defined]
    return new


class _Slot:
    """One fused tensor passed to the graph: which arguments it is built from."""

    def __init__(self, arg_index: list[Optional[int]], widths: list[int], storage: Storage) -> None:
        self.arg_index = arg_index  # argument position of each member (None: no bias)
        self.widths = widths
        self.ref = weakref.ref(storage)

    def fused(self, args: tuple) -> Tensor:
        st = self.ref()
        members = [None if i is None else args[i] for i in self.arg_index]
        if st is not None and st.fits(members):
            return st.current(members)  # copies back only the members that moved
        st = storage_for(members, self.widths)
        if st is None:  # the tensors now belong to another group: correct, but copies
            return concat_rows(members, self.widths)
        self.ref = weakref.ref(st)
        return st.fused


class FusedInputs:
    """Builds the storage-backed weight source for one Dynamo graph, and then
    the callable that feeds the fused tensors to the compiled graph."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list) -> None:
        self.gm = gm
        self.example_inputs = example_inputs
        self.placeholders = list(gm.graph.find_nodes(op="placeholder"))
        self.position = {n: i for i, n in enumerate(self.placeholders)}
        self.slots: list[_Slot] = []
        self.extra: list[Tensor] = []
        self.members: list[fx.Node] = []  # placeholders now read through a storage
        self.local: set[int] = set()  # arguments that are DTensors: their local tensor is stored
        # torchao int4: (argument, inner tensor name) the graph joins itself on every call,
        # one placeholder each, after the fused tensors' ones (`_fused_tail` is the last of those).
        self.columns: list[tuple[int, str]] = []
        self._fused_tail = self.placeholders[-1] if self.placeholders else None
        gm.meta[quantized.JOINS_KEY] = True  # torchao weights: their inner tensors are stored

    def _arg(self, op: Optional[Operand]) -> Optional[int]:
        """The argument index of a weight that can move into a storage, else -1."""
        if op is None:
            return None
        local = _to_local_of(op)
        if local is not None:  # a tensor-parallel shard (dtensor.py): store its local tensor
            op = local
        if not isinstance(op, fx.Node) or op not in self.position:
            return -1
        i = self.position[op]
        t = self.example_inputs[i] if i < len(self.example_inputs) else None
        # Parameters and buffers only (Dynamo marks them static): moving a
        # user's fresh input tensor into a storage would copy it on every call.
        static = op.meta.get("tensor_dict", {}).get("_dynamo_static_input_type")
        if not isinstance(t, Tensor) or isinstance(t, FakeTensor) or not static:
            return -1
        if len(op.users) != 1:
            return -1  # read elsewhere too: its placeholder must stay
        if torch.is_grad_enabled() and t.requires_grad:
            return -1  # autograd needs the member tensors themselves
        if local is not None:
            self.local.add(i)
        return i

    def __call__(self, gm: fx.GraphModule, group: Group) -> Union[dict[str, fx.Node], Reason, None]:
        """Weight source for `fuse_linears`: placeholders of the fused weight,
        bias and scales, each one storage; where any cannot be stored, None
        (concatenate in the graph) or, for int8 weights, the reason not to."""
        if len(group.members) < 2:
            return None  # duplicates of one call: the weight is used as it is
        stored = self._storages(group)
        if stored is None:
            return check_per_call_concat(gm, group)
        idx, storages = stored
        nodes = {k: self._add_input(st, idx[k], group) for k, st in storages.items()}
        for k, st in storages.items():
            if isinstance(st, quantized.SubclassStorage) and st.columns:
                nodes[k] = self._join_in_graph(nodes[k], st, idx[k], group)
        self.members += [self.placeholders[i] for ix in idx.values() for i in ix if i is not None]
        return nodes

    def _storages(self, group: Group) -> Optional[tuple[dict[str, list], dict[str, Storage]]]:
        """Argument indices and one storage per kind (weight, bias, scale), or None."""
        kinds = [k for k in ("weight", "bias", "scale") if any(getattr(m, k) is not None for m in group.members)]
        idx = {k: [self._arg(getattr(m, k)) for m in group.members] for k in kinds}
        if any(-1 in ix for ix in idx.values()):
            return None
        storages: dict[str, Storage] = {}
        with unset_fake_temporarily():
            for k in kinds:
                st = storage_for([None if i is None else self.example_inputs[i] for i in idx[k]], group.widths)
                if st is None:
                    return None
                storages[k] = st
        return idx, storages

    def _add_input(self, st: Storage, idx: list, group: Group) -> fx.Node:
        from torch._guards import TracingContext

        node = self._placeholder(f"fxfuse_fused_{len(self.slots)}", st.fused, group, after=self._fused_tail)
        self._fused_tail = node
        ctx = TracingContext.try_get()
        if ctx is not None and isinstance(st, quantized.SubclassStorage):
            ctx.tensor_to_context[st.fused] = quantized.static_context(st.fused, node._dynamo_source)  # type: ignore[attr-defined]
        self._fakify(st.fused)
        self.slots.append(_Slot(list(idx), list(group.widths), st))
        self.extra.append(st.fused)
        return node

    def _placeholder(self, name: str, t: Tensor, group: Group, after: Optional[fx.Node] = None) -> fx.Node:
        """A new static input of the graph, after `after` (default: the last one)."""
        from torch._dynamo.source import ConstantSource

        graph = self.gm.graph
        with graph.inserting_after(after or list(graph.find_nodes(op="placeholder"))[-1]):
            node = graph.placeholder(name)
        node._dynamo_source = ConstantSource(name)  # type: ignore[attr-defined]
        # Static: CUDA graphs read it in place instead of copying it per replay.
        node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
        t._dynamo_static_input_type = "unguarded"  # type: ignore[attr-defined]
        member_val = group.members[0].node.meta.get("example_value")
        if isinstance(member_val, FakeTensor):
            node.meta["example_value"] = member_val.fake_mode.from_tensor(t, static_shapes=True)
        return node

    @staticmethod
    def _fakify(t: Tensor) -> None:
        from torch._guards import TracingContext

        ctx = TracingContext.try_get()
        if ctx is not None and ctx.fake_mode is not None:
            # Fakify now, with static shapes: Inductor's later fakification
            # of this input finds this one instead of inventing symbols.
            ctx.fake_mode.from_tensor(t, static_shapes=True)

    def _join_in_graph(self, fused: fx.Node, st: "quantized.SubclassStorage", idx: list, group: Group) -> fx.Node:
        """The fused weight with the inner tensors whose rows are not dim 0
        (int4's scales) joined in the graph from the members' own, which the
        graph takes as inputs: read on every call, so never stale, and no copy
        outside the compiled graph (quantized.with_columns)."""
        graph = self.gm.graph
        parts = []
        for k in st.columns:
            nodes = []
            for i in idx:
                t = getattr(self.example_inputs[i], k)
                nodes.append(self._placeholder(f"fxfuse_column_{len(self.columns)}", t, group))
                self._fakify(t)
                self.columns.append((i, k))
            parts.append(tuple(nodes))
        first_op = next(n for n in graph.nodes if n.op != "placeholder")
        with graph.inserting_before(first_op):
            node = graph.call_function(
                quantized.with_columns, (fused, tuple(st.columns), tuple(st.columns.values()), tuple(parts)))
        if "example_value" in fused.meta:  # the same class, shape and metadata
            node.meta["example_value"] = fused.meta["example_value"]
        return node

    def added(self) -> list[Tensor]:
        """The values of the placeholders the rewrite added, in their order:
        the fused tensors, then the members' inner tensors the graph joins."""
        return self.extra + [getattr(self.example_inputs[i], k) for i, k in self.columns]

    def snapshot(self) -> tuple:
        """What `rollback` restores: the pass calls it before a rewrite."""
        existing = {id(s) for s in list(weights._REGISTRY.values())}
        return (len(self.slots), len(self.extra), len(self.members), frozenset(self.local), existing,
                len(self.columns), self._fused_tail)

    def rollback(self, state: tuple) -> None:
        """Forget the fused inputs added since `snapshot` (their placeholders
        are erased with the rest of a failed rewrite), and give the members of
        storages made since then their own memory back."""
        slots, extra, members, local, existing, columns, self._fused_tail = state
        for slot in self.slots[slots:]:
            st = slot.ref()
            if st is not None and id(st) not in existing:
                weights.release(st)
        del self.slots[slots:], self.extra[extra:], self.members[members:], self.columns[columns:]
        self.local = set(local)

    def prune(self) -> list[int]:
        """Drop the member placeholders the rewrite left unread; return the
        indices of the original arguments the compiled graph still takes."""
        graph = self.gm.graph
        for node in self.members:
            if not node.users:
                graph.erase_node(node)
        self.gm.recompile()
        alive = set(graph.find_nodes(op="placeholder"))
        return [i for i, n in enumerate(self.placeholders) if n in alive]

    def wrap(self, compiled: Callable, keep: list[int]) -> Callable:
        """The compiled graph, called with the kept arguments and the fused tensors.

        Every call first checks that each member still lives in its slice: one
        data-pointer comparison per member, in C++ where torch has it (CUDA
        builds), so the check costs microseconds for a 32-layer model.
        """
        slots = self.slots
        self.extra = []  # the slots find the tensors; hold no strong reference
        # torchao weights: check each inner tensor, appended after the arguments.
        inner = {i: st.names for slot in slots if isinstance(st := slot.ref(), quantized.SubclassStorage)
                 for i in slot.arg_index if i is not None}
        n_args = end = len(self.placeholders)
        extra_at: dict[int, int] = {}  # where each one's inner tensors start
        for i, names in inner.items():
            extra_at[i], end = end, end + len(names)
        checked = [i for slot in slots for i in slot.arg_index if i is not None and i not in inner]
        checked += range(n_args, end)
        inner_names = [(i, n) for i, names in inner.items() for n in names]
        columns = list(self.columns)  # torchao int4: inner tensors the graph joins itself
        local = sorted(self.local)  # DTensor arguments: check their local tensors
        # What each quantized member was compiled as: checked whenever one moved,
        # so Dynamo's own Python guards on them may be left out (guards.py).
        compiled_as = {i: guards.signature(self.example_inputs[i]) for i in inner}
        guards.COMPILE.took([self.example_inputs[i] for i in inner])
        same_ptrs = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", _same_ptrs)
        take = operator.itemgetter(*keep) if len(keep) > 1 else (lambda a: tuple(a[i] for i in keep))
        state: list = [None, []]  # expected pointers per argument, weak refs to the fused tensors

        def refresh(args: tuple) -> list[Tensor]:
            for i, sig in compiled_as.items():
                guards.check_unchanged(args[i], sig, f"the weight passed as argument {i}")
            fused = [slot.fused(args) for slot in slots]
            ptrs: list[Optional[int]] = [None] * end
            for slot in slots:
                st = slot.ref()
                if st is None or (isinstance(st, quantized.SubclassStorage) and any(
                        st.names != inner.get(i) for i in slot.arg_index)):
                    state[0] = None  # a temporary concatenation: check the slow way each call
                    return fused
                for i, p in zip(slot.arg_index, st.ptrs):
                    if i in inner:
                        ptrs[extra_at[i] : extra_at[i] + len(p)] = p  # type: ignore[arg-type]
                    elif i is not None:
                        ptrs[i] = p
            state[0], state[1] = ptrs, [weakref.ref(f) for f in fused]
            return fused

        def run(*args: Any) -> Any:
            ptrs = state[0]
            fused = None
            tensors = list(args)  # a list: torch's C++ check takes no tuple
            for i in local:
                tensors[i] = tensors[i]._local_tensor
            if inner_names:  # an inner tensor gone (None) reads as a moved one
                tensors += [_NO_TENSOR if (t := getattr(args[i], n, None)) is None else t for i, n in inner_names]
            if ptrs is not None and same_ptrs(tensors, ptrs, checked):
                fused = [r() for r in state[1]]
            if fused is None or any(f is None for f in fused):  # (`in` would call Tensor.__eq__)
                fused = refresh(args)
            if columns:
                fused = [*fused, *(getattr(args[i], k) for i, k in columns)]
            # Dynamo calls a backend's result unpacked, whatever `_boxed_call` says.
            return compiled(*take(args), *fused)

        return run


# Stands in for a missing inner tensor in the pointer check: no storage's data is at 0.
_NO_TENSOR = torch.empty(0)


def _to_local_of(op: Operand) -> Optional[fx.Node]:
    """p if `op` is ``p.to_local()`` of a placeholder read only there."""
    if isinstance(op, fx.Node) and op.op == "call_method" and op.target == "to_local" and len(op.users) == 1:
        p = op.args[0]
        if isinstance(p, fx.Node) and p.op == "placeholder" and len(p.users) == 1:
            return p
    return None


def _same_ptrs(tensors: list, ptrs: list, indices: list[int]) -> bool:
    """torch._C._tensors_data_ptrs_at_indices_equal where torch lacks it (CPU builds)."""
    if not isinstance(tensors, list):  # the same contract as the C++ function
        raise TypeError(f"expected a list of tensors, got {type(tensors).__name__}")
    return all(tensors[i].data_ptr() == ptrs[i] for i in indices)
