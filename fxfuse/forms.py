"""What a recognised linear call is, in either dialect: the `Linear` record,
the values behind its operands, and the pieces of a form that the matchers
of torch-level graphs (match.py) and of aten graphs (aten.py, and torchao's
forms in qforms.py) share: the per-output-channel scale and bias after a GEMM.

This module only reads graphs; it imports nothing else of fxfuse, so every
dialect's matcher can build on it without importing another.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import fx

__all__ = ["Linear", "Group", "Operand", "value_of", "module_path", "scaled", "stored_operands"]

# A weight or bias: a graph node, or the qualified name of a module attribute
# (the weight of a call_module nn.Linear is not a node of the graph).
Operand = Union[fx.Node, str]


@dataclass
class Linear:
    """One linear call site: ``node = linear(input, weight, bias)``."""

    node: fx.Node
    input: fx.Node
    weight: Operand
    bias: Optional[Operand]
    name: str  # the module path in the user's model, e.g. "layers.0.attention.wq"
    # Where input and weight are read: `node` itself, or the matmul of
    # ``x @ w.T + b`` whose result `node` adds the bias to.
    reads: Optional[fx.Node] = None
    # Nodes that only served this call (the matmul, the transpose): erased
    # with it when nothing else uses them.
    dead: tuple[fx.Node, ...] = ()
    cast: Optional[torch.dtype] = None  # ``w.to(cast)`` before the GEMM
    scale: Optional[Operand] = None  # per-output-channel scales after the GEMM
    # A quantized aten form (qforms.py): the member's own subgraph, replayed
    # once over the concatenated stored tensors. `weight` is then its [N, K]
    # quantized data and `extra` its other per-row tensors (scales).
    form: Any = None
    extra: tuple[Operand, ...] = ()

    def __post_init__(self) -> None:
        if self.reads is None:
            self.reads = self.node

    @property
    def operands(self) -> list[Operand]:
        shared = list(self.form.shared) if self.form is not None else []
        return [o for o in (self.weight, self.bias, self.scale, *self.extra, *shared) if o is not None]


def stored_operands(lin: Linear) -> dict[str, Optional[Operand]]:
    """The tensors a fused group concatenates row by row, by kind: the names
    weight sources give their fused nodes (`fuse.WeightSource`)."""
    out: dict[str, Optional[Operand]] = {"weight": lin.weight, "bias": lin.bias, "scale": lin.scale}
    out.update({f"extra_{i}": e for i, e in enumerate(lin.extra)})
    return out


@dataclass
class Group:
    """Sibling linears that will become one GEMM (a plain struct: no logic)."""

    input: fx.Node
    members: list[Linear]  # distinct (weight, bias) pairs, one GEMM slice each
    widths: list[int] = field(default_factory=list)  # out_features per member
    # Exact duplicates (same input, weight and bias as members[i]): computed once.
    duplicates: list[tuple[Linear, int]] = field(default_factory=list)

    @property
    def calls(self) -> list[Linear]:
        return self.members + [d for d, _ in self.duplicates]

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.calls]


def value_of(gm: fx.GraphModule, operand: Operand) -> object:
    """The tensor an operand stands for: a fake value from the node's meta, a
    real attribute for get_attr / module weights, or None if unknown."""
    if isinstance(operand, str):
        return _get_attr(gm, operand)
    if operand.op == "get_attr" and isinstance(operand.target, str):
        return _get_attr(gm, operand.target)
    for key in ("val", "example_value"):
        if key in operand.meta:
            return operand.meta[key]
    return None


def _get_attr(gm: fx.GraphModule, qualname: str) -> object:
    obj: object = gm
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


_ROOT = re.compile(r"^L\[[^\]]*\](\[[^\]]*\])*\.?")


def module_path(node: fx.Node) -> Optional[str]:
    """The user's dotted module name for a node, from its ``nn_module_stack``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    # Dynamo spells the root "L['self']", or "L['args'][0]" when the model was
    # entered through a wrapper; drop it, keep the module path.
    path = _ROOT.sub("", path)
    # Below it, Dynamo writes the sources it read: "__dict__['_modules']['down_blocks'].0"
    # or "_modules['x']" or "layers[0]". Users know the dotted name that
    # named_modules() gives (down_blocks.0): write that.
    path = re.sub(r"\.?(?:__dict__\[['\"]_modules['\"]\]|_modules)?\[['\"]?([^'\"\]]+)['\"]?\]", r".\1", path)
    return path.lstrip(".") or None


def _per_channel(gm: fx.GraphModule, n: object, width: int) -> bool:
    v = value_of(gm, n) if isinstance(n, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.dim() == 1 and v.shape[0] == width


def _other_operand(user: fx.Node, node: fx.Node, ops: tuple) -> Optional[object]:
    """The other operand of a binary ``user = node <op> other`` (op in `ops`)."""
    if user.op != "call_function" or user.target not in ops or user.kwargs or len(user.args) != 2:
        return None
    args = list(user.args)
    return args[1 - args.index(node)] if node in args else None


# Torch-level and aten spellings: the scales of a GEMM look alike in both.
_MULS = (operator.mul, torch.mul, torch.ops.aten.mul.Tensor)
_ADDS = (operator.add, torch.add, torch.ops.aten.add.Tensor)


def scaled(gm: fx.GraphModule, node: fx.Node, width: int) -> Optional[tuple]:
    """(result, scales, bias, dead) for ``node * s (+ b)`` with per-channel
    (1-D, `width`) s and b, or None."""
    if len(node.users) != 1:
        return None
    (mul,) = node.users
    s = _other_operand(mul, node, _MULS)
    if not _per_channel(gm, s, width):
        return None
    if len(mul.users) == 1:  # a bias added after the scale
        (add,) = mul.users
        bias = _other_operand(add, mul, _ADDS)
        if _per_channel(gm, bias, width):
            return add, s, bias, (node, mul)
    return mul, s, None, (node,)
