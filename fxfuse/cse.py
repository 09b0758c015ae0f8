"""Siblings behind duplicated producers: linears whose inputs are the same
pure computation of the same values read one input.

Diffusion transformers compute every AdaLN modulation from its own copy of
``silu(temb)``; to the matcher these are different input nodes:

    s1 = silu(temb)                       s1 = silu(temb)
    e1 = linear(s1, w1)          ==>      e1 = linear(s1, w1)   # one sibling set on s1:
    s2 = silu(temb)                       e2 = linear(s1, w2)   # fused as usual
    e2 = linear(s2, w2)

`share_producers` numbers the values linear inputs are computed from (value
numbering, on demand, through the ops it knows): two nodes get one number
when they call the same function or method (same target, same constant
arguments) on values with equal numbers. A linear whose input has the number
of an earlier node reads that earlier node (the first of its number in graph
order) in the plan, where the ops are pure; the repeated producers it leaves
without users go with the replaced calls.

Design: the graph is not touched here. Only the plan's `Linear` records read
the first producer, so when nothing is fused the graph stays exactly as it
was (merging the duplicates before matching would change graphs that then
fuse nothing, and would have to be undone).

Legality: a producer is shared only if it is pure and deterministic (a
whitelist: activations, norms, arithmetic, casts and views; aten ops without
mutable arguments or random seeds; `dropout`, `rand_like` and the like never
are), nothing in the graph may write in place to it or to anything it is
computed from (written anywhere, at any position), and it runs under the same
autocast / grad mode as the first (no state change between them).
"""

from __future__ import annotations

import logging
import math
import operator
from collections import Counter
from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx

from .legality import Reason, _storage, changes_state, mutated_args, written_nodes
from .forms import Linear, value_of

__all__ = ["share_producers"]

log = logging.getLogger(__name__)

_PURE_FUNCTIONS = {
    F.silu, F.gelu, F.relu, F.mish, F.softplus, F.sigmoid, F.tanh, F.layer_norm, F.group_norm,
    F.normalize, torch.sigmoid, torch.tanh, torch.exp, torch.relu, torch.neg, torch.rsqrt, torch.sqrt,
    torch.add, torch.sub, torch.mul, torch.div, torch.cat, torch.stack, torch.reshape, torch.flatten,
    torch.unsqueeze, torch.squeeze, torch.transpose, torch.permute, torch.chunk, torch.split,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.getitem,
}
for _name in ("rms_norm",):
    if hasattr(F, _name):
        _PURE_FUNCTIONS.add(getattr(F, _name))

_PURE_METHODS = {
    "to", "float", "half", "bfloat16", "type_as", "contiguous", "view", "reshape", "unsqueeze",
    "squeeze", "flatten", "transpose", "permute", "chunk", "split", "sigmoid", "tanh", "exp", "neg",
    "add", "sub", "mul", "div", "__getitem__", "size",
}

_PURE_MODULES = (torch.nn.SiLU, torch.nn.GELU, torch.nn.ReLU, torch.nn.Mish, torch.nn.Sigmoid, torch.nn.Tanh,
                 torch.nn.Identity)


# Random ops: spelled alike, never equal. Numbered (so two dropouts of one
# input are seen as a repeat, and the refusal is counted), never shared.
_RANDOM_FUNCTIONS = {
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, torch.dropout,
    torch.rand_like, torch.randn_like, torch.randint_like, torch.bernoulli, torch.multinomial, torch.normal,
    torch.rand, torch.randn, torch.randint, torch.randperm,
}
_RANDOM_METHODS = {"bernoulli", "bernoulli_", "uniform_", "normal_", "random_", "exponential_", "multinomial"}
_RANDOM_MODULES = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
                   torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)
_SEEDED = {torch.Tag.nondeterministic_seeded, torch.Tag.nondeterministic_bitwise}


def _in(target: object, functions: set) -> bool:
    try:
        return target in functions
    except TypeError:  # unhashable target
        return False


def _is_random(gm: fx.GraphModule, node: fx.Node) -> bool:
    t = node.target
    if node.op == "call_function":
        return bool(_SEEDED & set(t.tags)) if isinstance(t, torch._ops.OpOverload) else _in(t, _RANDOM_FUNCTIONS)
    if node.op == "call_method":
        return t in _RANDOM_METHODS
    return node.op == "call_module" and isinstance(gm.get_submodule(str(t)), _RANDOM_MODULES)


def _is_spelled(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Is `node` an op this pass compares at all (pure-listed or random)?
    Numbering stops at any other node: a linear, attention, a user function."""
    t = node.target
    if node.op == "call_function":
        if isinstance(t, torch._ops.OpOverload):
            return torch.Tag.pointwise in t.tags or bool(_SEEDED & set(t.tags)) or t.is_view
        return _in(t, _PURE_FUNCTIONS) or _in(t, _RANDOM_FUNCTIONS)
    if node.op == "call_method":
        return t in _PURE_METHODS or t in _RANDOM_METHODS
    if node.op == "call_module":
        mod = gm.get_submodule(str(t))
        return isinstance(mod, _RANDOM_MODULES) or type(mod) in _PURE_MODULES
    return False


def _is_pure(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A pure, deterministic op that writes nothing: equal inputs give equal outputs."""
    if _is_random(gm, node) or node.is_impure() or mutated_args(gm, node) or changes_state(node):
        return False
    if isinstance(node.kwargs.get("out"), fx.Node):
        return False
    if node.op == "call_module":
        return not getattr(gm.get_submodule(str(node.target)), "inplace", False)
    t = node.target
    return not (isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable)


_CASTS = {"to", "type_as", "float", "half", "bfloat16", "contiguous"}


def _is_noop_cast(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A cast that returns its input as it is (same dtype, device, shape and
    strides): ``silu(t).to(x.dtype)`` in diffusers' AdaLayerNormContinuous."""
    if node.op != "call_method" or node.target not in _CASTS or not node.args:
        return False
    if not isinstance(node.args[0], fx.Node) or node.kwargs.get("copy") or "memory_format" in node.kwargs:
        return False
    a, b = value_of(gm, node.args[0]), value_of(gm, node)
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
            and a.device == b.device and a.shape == b.shape and a.stride() == b.stride())


def _constant_key(a: object, vn: dict[fx.Node, int]) -> Optional[object]:
    """A hashable key for an argument: nodes by value number; None if unhashable."""
    if isinstance(a, fx.Node):
        return ("node", vn[a])
    if isinstance(a, (tuple, list)):
        keys = [_constant_key(x, vn) for x in a]
        return None if any(k is None for k in keys) else (type(a).__name__, tuple(keys))
    if isinstance(a, dict):
        keys = {k: _constant_key(v, vn) for k, v in a.items()}
        return None if any(v is None for v in keys.values()) else ("dict", tuple(sorted(keys.items())))
    if isinstance(a, float) and math.isnan(a):
        return None
    try:
        hash(a)
    except TypeError:
        return None
    return (type(a).__name__, a)


class _Numbering:
    """Value numbers, computed on demand for the nodes linear inputs are
    computed from, through spelled ops only (`_is_spelled`): two nodes get
    one number when they have the same op, target and constant arguments,
    and tensor arguments of equal numbers; a cast that returns its input
    unchanged has its input's number; any other node has a number of its
    own. Equal numbers mean equal values only where `_shareable` says so."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.num: dict[fx.Node, int] = {}
        self.classes: dict[object, int] = {}

    def __call__(self, node: fx.Node) -> int:
        num, stack = self.num, [node]
        while stack:  # post-order without recursion: chains can be long
            n = stack[-1]
            if n in num:
                stack.pop()
                continue
            if not _is_spelled(self.gm, n):
                num[n] = len(num) + 1
                stack.pop()
                continue
            pending = [a for a in n.all_input_nodes if a not in num]
            if pending:
                stack += pending
                continue
            stack.pop()
            if _is_noop_cast(self.gm, n):  # x.to(x.dtype) is x
                num[n] = num[n.args[0]]  # type: ignore[index]
                continue
            args, kwargs = _constant_key(tuple(n.args), num), _constant_key(dict(n.kwargs), num)
            if args is None or kwargs is None:
                num[n] = len(num) + 1
                continue
            target = n.target
            if n.op == "call_module":  # another instance of the same module and settings
                mod = self.gm.get_submodule(str(n.target))
                target = (type(mod), mod.extra_repr())
            num[n] = self.classes.setdefault((n.op, target, args, kwargs), -(len(self.classes) + 1))
        return num[node]

    def cone(self, node: fx.Node) -> tuple[set[fx.Node], set[fx.Node]]:
        """(the spelled nodes `node`'s number was computed from, the other
        nodes those read)."""
        inner: set[fx.Node] = set()
        leaves: set[fx.Node] = set()
        stack = [node]
        while stack:
            n = stack.pop()
            if n in inner or n in leaves:
                continue
            if _is_spelled(self.gm, n):
                inner.add(n)
                stack += n.all_input_nodes
            else:
                leaves.add(n)
        return inner, leaves


def _shareable(gm: fx.GraphModule, numbering: _Numbering, inputs: list[fx.Node], nodes: list[fx.Node],
               position: dict[fx.Node, int], written: tuple[set[fx.Node], set[int]]) -> bool:
    """May these inputs, numbered alike, be read as one? Every op they are
    computed from is pure and deterministic; nothing in the graph writes to
    any of those nodes or to what they read; no autocast / grad-mode change
    lies between the first of them and the last."""
    inner: set[fx.Node] = set()
    leaves: set[fx.Node] = set()
    for x in inputs:
        i, rest = numbering.cone(x)
        inner |= i
        leaves |= rest
    if not all(_is_pure(gm, n) for n in inner):
        return False
    nodes_written, storages = written
    for n in inner | leaves:
        if n in nodes_written or ((key := _storage(gm, n)) is not None and key in storages):
            return False
    span = [position[n] for n in inner]
    return not any(changes_state(n) for n in nodes[min(span): max(span) + 1])


def share_producers(gm: fx.GraphModule, linears: list[Linear]) -> tuple[list[Linear], Counter]:
    """`linears`, where each one whose input repeats an earlier node's value
    reads that node instead (see the module docstring), and the calls left
    alone because their inputs repeat an op that may not be shared (random,
    impure, or reading something written in place), by reason. The graph is
    not changed."""
    unshared: Counter = Counter()
    if not _has_candidates(gm, linears):
        return linears, unshared
    numbering = _Numbering(gm)
    inputs: dict[int, list[fx.Node]] = {}
    for lin in linears:
        same = inputs.setdefault(numbering(lin.input), [])
        if lin.input not in same:
            same.append(lin.input)
    repeated = {k: v for k, v in inputs.items() if len(v) > 1}
    if not repeated:
        return linears, unshared
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    written = written_nodes(gm, nodes)
    first_of: dict[int, fx.Node] = {}  # number -> the first node of that number
    for n in sorted(numbering.num, key=position.__getitem__):
        first_of.setdefault(numbering.num[n], n)
    shared = {number: first_of[number] for number, xs in repeated.items()
              if _shareable(gm, numbering, xs, nodes, position, written)}
    out = []
    for lin in linears:
        number = numbering.num[lin.input]
        if number in repeated and number not in shared:
            unshared[Reason.PRODUCER_NOT_SHAREABLE.value] += 1
            log.debug("fxfuse: not fusing %s: its input %s repeats an op that may not be shared",
                      lin.name, lin.input.name)
        first = shared.get(number)
        if first is None or first is lin.input:
            out.append(lin)
            continue
        # The repeated producers only this call read go with it once fused.
        dups, stack = [], [lin.input]
        while stack:
            n = stack.pop()
            if n in numbering.num and first_of[numbering.num[n]] is not n and n not in dups:
                dups.append(n)
                stack += n.all_input_nodes
        log.debug("fxfuse: %s reads %s, which computes the same value as %s", lin.name, lin.input.name, first.name)
        out.append(replace(lin, input=first, dead=(*lin.dead, *dups)))
    return out, unshared


def _has_candidates(gm: fx.GraphModule, linears: list[Linear]) -> bool:
    """Cheap pre-check: do two linears read different pure nodes of one target?
    Most graphs have none, and then the value numbering is skipped."""
    seen: set[object] = set()
    inputs = {lin.input for lin in linears}
    for n in inputs:
        if n.op not in ("call_function", "call_method", "call_module"):
            continue
        key = (n.op, n.target if n.op != "call_module" else type(gm.get_submodule(str(n.target))))
        try:
            if key in seen:
                return True
            seen.add(key)
        except TypeError:
            continue
    return False
