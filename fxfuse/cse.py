"""Siblings behind duplicated producers: linears whose inputs are the same
pure computation of the same values read one input.

Diffusion transformers compute every AdaLN modulation from its own copy of
``silu(temb)``; to the matcher these are different input nodes:

    s1 = silu(temb)                       s1 = silu(temb)
    e1 = linear(s1, w1)          ==>      e1 = linear(s1, w1)   # one sibling set on s1:
    s2 = silu(temb)                       e2 = linear(s1, w2)   # fused as usual
    e2 = linear(s2, w2)

`share_producers` numbers the values of the graph (global value numbering):
two nodes get one number when they call the same pure function or method
(same target, same constant arguments) on values with equal numbers. A linear
whose input has the number of an earlier node reads that earlier node (the
first of its class in graph order) in the plan; the duplicated producers it
leaves without users go with the replaced calls.

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
from .match import Linear, value_of

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


def _is_pure(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A pure, deterministic op that writes nothing: equal inputs give equal outputs."""
    if node.is_impure() or mutated_args(gm, node) or changes_state(node):
        return False
    if isinstance(node.kwargs.get("out"), fx.Node):
        return False
    if node.op == "call_function":
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            return not t._schema.is_mutable and not (
                {torch.Tag.nondeterministic_seeded, torch.Tag.nondeterministic_bitwise} & set(t.tags))
        try:
            return t in _PURE_FUNCTIONS
        except TypeError:  # unhashable target
            return False
    if node.op == "call_method":
        return node.target in _PURE_METHODS
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        return type(mod) in _PURE_MODULES and not getattr(mod, "inplace", False)
    return False


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


def value_numbers(gm: fx.GraphModule) -> tuple[dict[fx.Node, int], dict[fx.Node, int]]:
    """Two numberings of the nodes. In the first, nodes share a number when
    they surely compute the same value. In the second, when they are spelled
    alike (same op, target and arguments by this numbering), whether or not
    the op may be shared: alike in the second but not the first is a refusal."""
    nodes = list(gm.graph.nodes)
    written, storages = written_nodes(gm, nodes)
    vn: dict[fx.Node, int] = {}
    sn: dict[fx.Node, int] = {}
    classes: dict[object, int] = {}
    spellings: dict[object, int] = {}
    clean: set[fx.Node] = set()  # neither it nor anything it is computed from is written in place
    region = 0  # autocast / grad-mode changes seen so far
    for i, node in enumerate(nodes):
        if changes_state(node):
            region += 1
        unwritten = node not in written and _storage(gm, node) not in storages
        if unwritten and all(a in clean for a in node.all_input_nodes):
            clean.add(node)
        vn[node] = sn[node] = i + 1  # a number of its own, unless a class below
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        if node in clean and _is_noop_cast(gm, node):  # x.to(x.dtype) is x
            vn[node], sn[node] = vn[node.args[0]], sn[node.args[0]]  # type: ignore[index]
            continue
        target = node.target
        if node.op == "call_module":  # another instance of the same module and settings
            mod = gm.get_submodule(str(node.target))
            target = (type(mod), mod.extra_repr())
        for numbers, known, shareable in ((sn, spellings, True), (vn, classes, node in clean and _is_pure(gm, node))):
            args = _constant_key(tuple(node.args), numbers)
            kwargs = _constant_key(dict(node.kwargs), numbers)
            if shareable and args is not None and kwargs is not None:
                numbers[node] = known.setdefault((node.op, target, args, kwargs, region), -(len(known) + 1))
    return vn, sn


def share_producers(gm: fx.GraphModule, linears: list[Linear]) -> tuple[list[Linear], Counter]:
    """`linears`, where each one whose input duplicates an earlier node's
    value reads that node instead (see the module docstring), and the calls
    left alone because their inputs repeat an op that may not be shared
    (impure, or reading something written in place), by reason. The graph
    is not changed."""
    unshared: Counter = Counter()
    if not _has_candidates(gm, linears):
        return linears, unshared
    vn, sn = value_numbers(gm)
    by_number: dict[int, list[Linear]] = {}
    for lin in linears:
        by_number.setdefault(vn[lin.input], []).append(lin)
    # Calls whose inputs are spelled alike but were not shared: say why they stay apart.
    spelled: dict[int, set[int]] = {}
    for lin in linears:
        spelled.setdefault(sn[lin.input], set()).add(vn[lin.input])
    for lin in linears:
        if len(spelled[sn[lin.input]]) > 1:
            unshared[Reason.PRODUCER_NOT_SHAREABLE.value] += 1
            log.debug("fxfuse: not fusing %s: its input %s repeats an op that may not be shared",
                      lin.name, lin.input.name)
    first: dict[int, fx.Node] = {}
    for node in gm.graph.nodes:
        first.setdefault(vn[node], node)
    out = []
    for lin in linears:
        number = vn[lin.input]
        shared = first[number]
        if shared is lin.input or len(by_number[number]) < 2:
            out.append(lin)
            continue
        # The duplicated producers only this call read go with it once fused.
        dups, stack = [], [lin.input]
        while stack:
            n = stack.pop()
            if first[vn[n]] is not n and n not in dups:
                dups.append(n)
                stack += n.all_input_nodes
        log.debug("fxfuse: %s reads %s, which computes the same value as %s", lin.name, lin.input.name, shared.name)
        out.append(replace(lin, input=shared, dead=(*lin.dead, *dups)))
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
