"""When siblings may be fused: one predicate per reason, each returning a
`Reason` (refused) or None (fine). Cheap attribute checks come first and the
graph walks last, since the walks cost the most.

Anything these predicates cannot prove safe is refused: a refusal costs one
GEMM launch, a wrong fusion costs a wrong answer.
"""

from __future__ import annotations

import enum
import functools
import inspect
import math
import operator
from typing import Callable, Iterable, Optional

import torch
from torch import fx
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from . import quantized
from .forms import Group, Linear, Operand, value_of

__all__ = [
    "Reason", "check_member", "incompatibility", "check_independent", "insertion_point", "check_no_mutation",
    "check_per_call_concat",
]


class Reason(str, enum.Enum):
    """Why linear calls were left alone. The value is the name in reports."""

    UNKNOWN_WEIGHT = "unknown_weight"  # no tensor value in the node's meta
    TENSOR_SUBCLASS = "tensor_subclass_weight"
    # Packed in another dtype than it computes in (torchao's Int8Tensor, AffineQuantizedTensor, ...),
    # of a layout quantized.py does not know, or where no storage can join it (see check_member).
    QUANTIZED_SUBCLASS = "quantized_tensor_subclass_weight"
    # torchao weights that cannot be joined row by row (quantized.py):
    QUANT_SUBCLASS_MISMATCH = "quantized_subclass_mismatch"  # different classes (Int8Tensor, Float8Tensor)
    # Same class, other metadata: block size, granularity, activation quantization, inner dtypes.
    QUANT_METADATA_MISMATCH = "quantization_metadata_mismatch"
    QUANT_NOT_PER_ROW = "quantized_scales_not_per_row"  # per-tensor scales, an input pre-scale
    # Packed int4 rows interleaved in tiles (16 rows on CUDA, 64 on CPU) that the
    # member's output channels do not fill: its last tile would sit inside the joined one.
    QUANT_NOT_TILE_ALIGNED = "quantized_rows_not_tile_aligned"
    WEIGHT_NOT_2D = "weight_not_2d"
    SYMBOLIC_SHAPE = "symbolic_weight_shape"
    BAD_BIAS = "bias_shape_or_dtype"
    DTYPE_MISMATCH = "dtype_mismatch"
    DEVICE_MISMATCH = "device_mismatch"
    IN_FEATURES_MISMATCH = "in_features_mismatch"
    QUANT_MISMATCH = "dequantization_mismatch"  # quantized and plain, or other cast/scale dtypes
    # int8 weights would be concatenated in the graph on every call (see check_per_call_concat).
    QUANT_CONCAT_PER_CALL = "quantized_weights_concatenated_per_call"
    # torch.ao's quantize_dynamic linears: Dynamo ends the graph at each (its packed
    # weight is no tensor) and the call runs outside every graph. The backend counts
    # one per graph that ended at one (calls in frames Dynamo skips go uncounted).
    AO_DYNAMIC_QUANT = "torch_ao_dynamic_quantized_linear_outside_graph"
    NEEDS_GRAD = "weights_need_grad"
    SHARDED_INPUT_NEEDS_GRAD = "sharded_input_needs_grad"  # tensor parallel: see dtensor.py
    BELOW_MIN_GROUP_SIZE = "below_min_group_size"
    TOO_MANY_ROWS = "input_rows_above_max_rows"
    # The cost model predicts too small a gain from one fused GEMM (cost.py).
    PREDICTED_GAIN_TOO_SMALL = "predicted_gain_below_min_speedup"
    # Inputs that repeat one op which may not be shared: impure, random, or
    # reading something written in place (cse.py).
    PRODUCER_NOT_SHAREABLE = "input_repeats_an_unshareable_op"
    MEMBER_DEPENDS_ON_MEMBER = "member_depends_on_member"
    MUTATION_BETWEEN_MEMBERS = "mutation_between_members"
    STATE_CHANGE_BETWEEN_MEMBERS = "autocast_or_grad_mode_change_between_members"
    OUTPUT_WRITTEN = "member_output_written_in_place"
    UNUSED_OUTPUT = "unused_output"  # nothing returned or written depends on it
    OUTPUT_LEAVES_GRAPH = "output_leaves_graph_with_grad"
    DUPLICATE_OUTPUT_LEAVES_GRAPH = "repeated_call_output_leaves_graph"
    NO_LEGAL_POSITION = "no_legal_position"
    VETOED = "vetoed_by_should_fuse"
    ERROR = "error_in_pass"


def _is_plain(t: object) -> bool:
    return isinstance(t, torch.Tensor) and not is_traceable_wrapper_subclass(t)


def _packs_narrower(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Does the wrapper subclass `t` keep data (at any depth) in an integer
    dtype, or a floating one narrower than `dtype`? Then it is a quantized
    weight: its linear is the subclass's own kernel, with nothing to concatenate."""
    for name in t.__tensor_flatten__()[0]:
        inner = getattr(t, name, None)
        if is_traceable_wrapper_subclass(inner):
            if _packs_narrower(inner, dtype):  # type: ignore[arg-type]
                return True
        elif isinstance(inner, torch.Tensor) and (
            not inner.is_floating_point() or inner.element_size() < dtype.itemsize
        ):
            return True
    return False


def _check_quantized(gm: fx.GraphModule, w: torch.Tensor) -> Optional[Reason]:
    """A torchao weight joins its siblings only where the graph's weight
    source stores joined rows (the backend's storage, which sets
    `quantized.JOINS_KEY`): no in-graph concatenation exists for it."""
    if not quantized.is_quantized_subclass(w):
        return Reason.QUANTIZED_SUBCLASS if _packs_narrower(w, w.dtype) else Reason.TENSOR_SUBCLASS
    if not gm.meta.get(quantized.JOINS_KEY):
        return Reason.QUANTIZED_SUBCLASS
    problem = quantized.row_problem(w)
    if problem == "not_tile_aligned":
        return Reason.QUANT_NOT_TILE_ALIGNED
    return Reason.QUANT_NOT_PER_ROW if problem is not None else None


def _is_static(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool)


def check_member(gm: fx.GraphModule, lin: Linear, allow_grad: bool) -> Optional[Reason]:
    """Can this linear's weight and bias take part in a fused GEMM at all?"""
    w = value_of(gm, lin.weight)
    if not isinstance(w, torch.Tensor):
        return Reason.UNKNOWN_WEIGHT
    if lin.form is not None and lin.form.refusal is not None:
        return Reason(lin.form.refusal)  # a torchao form recognised in order to say why not
    if not _is_plain(w):
        reason = _check_quantized(gm, w)
        if reason is not None:
            return reason
    if w.dim() != 2:
        return Reason.WEIGHT_NOT_2D
    if not all(_is_static(s) for s in w.shape):
        return Reason.SYMBOLIC_SHAPE
    out_dtype = lin.cast or w.dtype
    for vec in (lin.bias, lin.scale):  # per-output-channel vectors
        if vec is None:
            continue
        v = value_of(gm, vec)
        if not isinstance(v, torch.Tensor):
            return Reason.UNKNOWN_WEIGHT
        if not _is_plain(v):
            return Reason.TENSOR_SUBCLASS
        if tuple(v.shape) != (w.shape[0],) or v.device != w.device or (vec is lin.bias and v.dtype != out_dtype):
            return Reason.BAD_BIAS
    if not allow_grad and any(getattr(value_of(gm, o), "requires_grad", False) for o in lin.operands):
        return Reason.NEEDS_GRAD
    return None


def check_rows(gm: fx.GraphModule, x: fx.Node, max_rows: Optional[int]) -> Optional[Reason]:
    """Is the shared input small enough for fusing to pay (rows = all dims but the last)?

    Symbolic row counts pass: a dynamic-shape graph serves decode steps too.
    """
    if max_rows is None:
        return None
    v = value_of(gm, x)
    if not isinstance(v, torch.Tensor) or v.dim() == 0:
        return None
    rows = static_rows(v)
    return Reason.TOO_MANY_ROWS if rows is not None and rows > max_rows else None


def static_rows(v: torch.Tensor) -> Optional[int]:
    """The rows of an input (all dims but the last), None where symbolic."""
    dims = v.shape[:-1]
    return math.prod(dims) if all(_is_static(d) for d in dims) else None


def incompatibility(gm: fx.GraphModule, a: Linear, b: Linear) -> Optional[Reason]:
    """Why `b` cannot share a GEMM with `a` (both passed `check_member`)."""
    wa, wb = value_of(gm, a.weight), value_of(gm, b.weight)
    assert isinstance(wa, torch.Tensor) and isinstance(wb, torch.Tensor)
    if _is_plain(wa) != _is_plain(wb) or (a.form is None) != (b.form is None):
        return Reason.QUANT_MISMATCH
    if a.form is not None and a.form.signature != b.form.signature:
        # Other ops, dtypes or constants around the GEMM (weight-only next to
        # dynamic activations), or another activation scale node.
        return Reason.QUANT_METADATA_MISMATCH
    if not _is_plain(wa):
        why = quantized.mismatch(wa, wb)
        if why is not None:
            return Reason.QUANT_SUBCLASS_MISMATCH if why == "class" else Reason.QUANT_METADATA_MISMATCH
    sa, sb = (value_of(gm, m.scale) if m.scale is not None else None for m in (a, b))
    if a.cast != b.cast or (sa is None) != (sb is None) or (sa is not None and sa.dtype != sb.dtype):  # type: ignore[union-attr]
        return Reason.QUANT_MISMATCH
    if wa.dtype != wb.dtype:
        return Reason.DTYPE_MISMATCH
    if wa.device != wb.device:
        return Reason.DEVICE_MISMATCH
    if wa.shape[1] != wb.shape[1]:
        return Reason.IN_FEATURES_MISMATCH
    return None


# ---------------------------------------------------------------- graph walks

# call_function targets whose result may share memory with their first input.
_VIEW_FUNCTIONS = {
    operator.getitem, torch.reshape, torch.transpose, torch.permute, torch.t,
    torch.squeeze, torch.unsqueeze, torch.flatten, torch.narrow, torch.select,
    torch.split, torch.chunk, torch.unbind, torch.movedim, torch.swapaxes,
    torch.diagonal, torch.as_strided, torch.view_as_real, torch.view_as_complex,
    torch.detach, torch.Tensor.view, torch.Tensor.reshape, torch.Tensor.contiguous,
    torch.Tensor.to, torch.Tensor.type_as, torch.Tensor.expand, torch.Tensor.__getitem__,
    # In eval mode these return their input itself.
    torch.nn.functional.dropout, torch.nn.functional.dropout1d, torch.nn.functional.dropout2d,
    torch.nn.functional.dropout3d, torch.nn.functional.alpha_dropout,
    torch.nn.functional.feature_alpha_dropout, torch.dropout,
}
_INPLACE_OPERATORS = {
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
    operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior,
    operator.ixor, operator.ilshift, operator.irshift, operator.imatmul,
}


def _is_builtin_pure_module(mod: torch.nn.Module) -> bool:
    return type(mod).__module__.startswith("torch.nn.") and not getattr(mod, "inplace", False)


def _view_parent(gm: fx.GraphModule, node: fx.Node) -> Optional[fx.Node]:
    """The node whose memory `node` may alias, if any."""
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if first is None:
        return None
    if node.op == "call_method":
        return first  # tensor methods (.view, .to, .contiguous, ...) may return self
    if node.op == "call_module":
        return first  # a module may return its input (nn.Identity, dropout in eval)
    if node.op == "call_function":
        t = node.target
        if t in _VIEW_FUNCTIONS:
            return first
        if isinstance(t, torch._ops.OpOverload) and any(
            r.alias_info is not None for r in t._schema.returns
        ):
            return first
    return None


def _alias_chain(gm: fx.GraphModule, node: fx.Node) -> set[fx.Node]:
    chain = {node}
    while (parent := _view_parent(gm, node)) is not None and parent not in chain:
        chain.add(parent)
        node = parent
    return chain


def mutated_args(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The nodes `node` may write to in place (conservative)."""
    inputs = node.all_input_nodes
    if node.op == "call_method":
        name = str(node.target)
        if (name.endswith("_") and not name.endswith("__")) or name in ("__setitem__", "__iadd__"):
            return inputs[:1]
        return []
    if node.op == "call_module":
        return [] if _is_builtin_pure_module(gm.get_submodule(str(node.target))) else inputs
    if node.op != "call_function":
        return []
    t = node.target
    if node.kwargs.get("inplace") is True or t in _INPLACE_OPERATORS or _inplace_by_position(node):
        return inputs[:1]
    if isinstance(node.kwargs.get("out"), fx.Node):
        return [node.kwargs["out"]]  # type: ignore[list-item]
    if isinstance(t, torch._ops.HigherOrderOperator):
        return inputs  # may run any code on its operands
    if isinstance(t, torch._ops.OpOverload):
        written = [
            a for a, s in zip(node.args, t._schema.arguments)
            if isinstance(a, fx.Node) and s.alias_info is not None and s.alias_info.is_write
        ]
        return written
    name = getattr(t, "__name__", "")
    if name.endswith("_") and not name.endswith("__"):
        return inputs[:1]
    return []


@functools.lru_cache(maxsize=None)
def _inplace_index(fn: Callable) -> Optional[int]:
    """Position of an ``inplace`` parameter in `fn`'s signature, if any."""
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("inplace") if "inplace" in params else None


def _inplace_by_position(node: fx.Node) -> bool:
    """``F.relu(x, True)``: an inplace flag passed by position."""
    if not callable(node.target) or isinstance(node.target, torch._ops.OpOverload):
        return False
    try:
        i = _inplace_index(node.target)
    except TypeError:  # unhashable target
        return False
    return i is not None and len(node.args) > i and node.args[i] is True


# Ops that change how later ops run (autocast, grad mode): a member moved
# across one would run under other settings.
_STATE_NAMES = ("autocast", "grad_enabled", "set_grad", "no_grad", "enable_grad", "inference_mode")


def changes_state(node: fx.Node) -> bool:
    if node.op not in ("call_function", "call_method"):
        return False
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
    return any(k in name for k in _STATE_NAMES)


def _storage(gm: fx.GraphModule, n: fx.Node) -> Optional[int]:
    """Identity of the storage behind a node's (fake or real) value: views of
    one tensor, and graph inputs that alias, share it."""
    v = value_of(gm, n)
    if not isinstance(v, torch.Tensor) or is_traceable_wrapper_subclass(v):
        return None
    try:
        return v.untyped_storage()._cdata
    except Exception:  # noqa: BLE001 - no storage (sparse, ...): unknown
        return None


def written_nodes(gm: fx.GraphModule, nodes: list[fx.Node]) -> tuple[set[fx.Node], set[int]]:
    """Everything the graph writes in place: the nodes (with what they may
    alias) and their storages. Computed once per pass."""
    written: set[fx.Node] = set()
    storages: set[int] = set()
    for node in nodes:
        for target in mutated_args(gm, node):
            written |= _alias_chain(gm, target)
            if (key := _storage(gm, target)) is not None:
                storages.add(key)
    return written, storages


def live_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes something the graph returns or writes depends on; the rest is
    dead code, which Dynamo keeps (``s = tanh(linear(x, w))``, s unused).
    One backward walk: a node is live if it has an effect or a live user."""
    live: set[fx.Node] = set()
    for node in reversed(gm.graph.nodes):
        # A live user settles it cheaply; most nodes have one.
        if (node.op == "output" or any(u in live for u in node.users)
                or node.is_impure() or mutated_args(gm, node) or changes_state(node)):
            live.add(node)
    return live


def leaves_graph(gm: fx.GraphModule, lin: Linear) -> bool:
    """Is the call's result (or a view of it) an output of the graph?"""
    return escapes(gm, lin.node)


def escapes(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Is `node`'s value, or a view of it through any chain of views, an
    output of the graph? A method that may return self (`.relu()` does not)
    counts unless the values show another storage."""
    own = _storage(gm, node)
    seen, stack = {node}, [node]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u.op == "output":
                return True
            if u not in seen and _view_parent(gm, u) is n and (own is None or _storage(gm, u) in (None, own)):
                seen.add(u)
                stack.append(u)
    return False


def check_outputs_not_written(
    gm: fx.GraphModule, calls: list[Linear], written: tuple[set[fx.Node], set[int]]
) -> Optional[Reason]:
    """Fused outputs are views of one tensor (and duplicates share one): a
    member output written in place would differ from eager (or, under autograd,
    raise)."""
    nodes, storages = written
    for m in calls:
        views = [u for u in m.node.users if _view_parent(gm, u) is m.node]
        for n in (m.node, *views):
            if n in nodes or ((key := _storage(gm, n)) is not None and key in storages):
                return Reason.OUTPUT_WRITTEN
    return None


def _ancestors_within(nodes: Iterable[fx.Node], floor: int, order: dict[fx.Node, int]) -> set[fx.Node]:
    """Every node the given nodes depend on, down to graph position `floor`."""
    seen: set[fx.Node] = set()
    stack = [n for n in nodes if order[n] >= floor]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(a for a in n.all_input_nodes if order[a] >= floor)
    return seen


def _nodes(ops: Iterable[Operand]) -> list[fx.Node]:
    return [o for o in ops if isinstance(o, fx.Node)]


def insertion_point(members: list[Linear], order: dict[fx.Node, int], nodes: list[fx.Node]) -> Optional[fx.Node]:
    """Where the fused GEMM goes: after every operand, before any member's first user.

    Returns the node to insert before, or None when no such place exists.
    """
    first = min(order[m.reads] for m in members)  # type: ignore[index]
    operands = _nodes(o for m in members for o in m.operands)
    latest = max((order[o] for o in operands), default=-1)
    at = max(first, latest + 1)
    first_use = min((order[u] for m in members for u in m.node.users), default=len(nodes))
    return nodes[at] if at <= first_use and at < len(nodes) else None


def _results(members: list[Linear]) -> set[fx.Node]:
    """The nodes computing each member's result (with the matmul of ``x @ w.T + b``)."""
    return {m.node for m in members} | {m.reads for m in members}  # type: ignore[misc]


def check_independent(members: list[Linear], order: dict[fx.Node, int]) -> Optional[Reason]:
    """No member may (transitively) feed another member's weight or bias."""
    member_nodes = _results(members)
    first = min(order[n] for n in member_nodes)
    ancestors = _ancestors_within(_nodes(o for m in members for o in m.operands), first, order)
    return Reason.MEMBER_DEPENDS_ON_MEMBER if ancestors & member_nodes else None


def check_no_mutation(
    gm: fx.GraphModule,
    members: list[Linear],
    anchor: fx.Node,
    order: dict[fx.Node, int],
    nodes: list[fx.Node],
) -> Optional[Reason]:
    """Is it safe to compute all members at `anchor` instead of where they are?"""
    member_nodes = _results(members)
    first = min(order[n] for n in member_nodes)
    # Every member now reads its operands at `anchor`: nothing that may write
    # to them (or to memory they alias) may run between `anchor` and any member.
    lo = min(first, order[anchor])
    hi = max(max(order[n] for n in member_nodes), order[anchor])
    operands = [members[0].input] + [o for m in members for o in m.operands]
    watched: set[fx.Node] = set()
    for o in _nodes(operands):
        watched |= _alias_chain(gm, o)
    # A module weight (call_module form) is written through a get_attr of it.
    attrs = {o for o in operands if isinstance(o, str)}
    if attrs:
        watched |= {n for n in nodes if n.op == "get_attr" and n.target in attrs}
    # Aliasing the graph does not spell out (a view made by any function, two
    # inputs that alias) shows in the values: they share a storage.
    storages = {key for o in _nodes(operands) if (key := _storage(gm, o)) is not None}
    for node in nodes[lo : hi + 1]:
        if node in member_nodes:
            continue
        if changes_state(node):
            return Reason.STATE_CHANGE_BETWEEN_MEMBERS
        for target in mutated_args(gm, node):
            if _alias_chain(gm, target) & watched or _storage(gm, target) in storages:
                return Reason.MUTATION_BETWEEN_MEMBERS
    return None


def check_per_call_concat(gm: fx.GraphModule, group: Group) -> Optional[Reason]:
    """For a weight source that would concatenate this group in the graph:
    integer (int8) weights are refused. Weight-only int8 exists to read fewer
    bytes per token, and a per-call concatenation writes and reads every int8
    weight once more. Inductor's int8 lowering on CUDA also asserts on a
    weight that is a concatenation rather than a buffer (torch 2.11)."""
    for m in group.members:
        if m.form is not None:  # torchao's aten forms: int8 or float8 rows
            return Reason.QUANT_CONCAT_PER_CALL
        w = value_of(gm, m.weight)
        if m.cast is not None and isinstance(w, torch.Tensor) and not w.is_floating_point():
            return Reason.QUANT_CONCAT_PER_CALL
        if quantized.is_quantized_subclass(w):  # torchao: no in-graph concatenation at all
            return Reason.QUANT_CONCAT_PER_CALL
    return None
