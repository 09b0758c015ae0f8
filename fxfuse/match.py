"""Find linear calls and group the siblings that read the same input.

Nothing here mutates the graph. A linear call is any of

    torch._C._nn.linear(x, w, b)      # F.linear; Dynamo graphs (w a placeholder)
    call_module[nn.Linear](x)         # symbolic_trace graphs (w a module attribute)
    x @ w.T (+ b)                     # also torch.matmul / x.matmul, with w.t(),
                                      # w.transpose(0, 1) or w.permute(1, 0)
    torch.addmm(b, x, w.t())          # beta = alpha = 1
    linear(x, w.to(dt)) * s (+ b)     # weight-only quantization (int8 w, per-channel s)

where w is a 2-D weight and b a bias of its width (so Hugging Face's Falcon,
which writes its linears as matmuls, fuses like F.linear). For the last form
the member's weight is the stored (int8) tensor, `cast` the dtype it is
dequantized to and `scale` its per-output-channel scales: the fused GEMM
concatenates the stored weights and the scales, not the dequantized weights.

Siblings are linear calls whose input is the same node. They are returned per
input, in graph order, so the pass is deterministic.
"""

from __future__ import annotations

from typing import Optional

import builtins
import operator

import torch
from torch import fx

from .aten import as_aten_linear
from .forms import Group, Linear, Operand, module_path as _module_path, scaled as _scaled, value_of

__all__ = ["Linear", "Group", "Operand", "find_linears", "count_linears", "siblings", "value_of"]

LINEAR_FUNCTIONS = (torch._C._nn.linear, torch.nn.functional.linear)


def as_linear(gm: fx.GraphModule, node: fx.Node) -> Optional[Linear]:
    """The `Linear` view of `node`, or None if it is not a recognised linear."""
    if isinstance(node.target, torch._ops.OpOverload):
        return as_aten_linear(gm, node)
    if node.op == "call_function" and node.target in LINEAR_FUNCTIONS:
        args = list(node.args) + [None] * (3 - len(node.args))
        x = node.kwargs.get("input", args[0])
        w = node.kwargs.get("weight", args[1])
        b = node.kwargs.get("bias", args[2])
        if not isinstance(x, fx.Node) or not isinstance(w, fx.Node):
            return None
        if b is not None and not isinstance(b, fx.Node):
            return None
        if (q := _as_dequant_linear(gm, node, x, w, b)) is not None:
            return q
        return Linear(node, x, w, b, _module_path(node) or node.name)
    if node.op == "call_module" and isinstance(node.target, str):
        mod = gm.get_submodule(node.target)
        # Exactly nn.Linear: subclasses may override forward.
        if type(mod) is not torch.nn.Linear or len(node.args) != 1 or node.kwargs:
            return None
        if not isinstance(node.args[0], fx.Node):
            return None
        bias = f"{node.target}.bias" if mod.bias is not None else None
        return Linear(node, node.args[0], f"{node.target}.weight", bias, node.target)
    return _as_matmul_linear(gm, node)


def _cast_of(n: fx.Node) -> Optional[tuple[fx.Node, torch.dtype]]:
    """(w, dtype) if `n` is ``w.to(dtype)`` / ``w.to(dtype=dtype)``, else None."""
    if n.op != "call_method" or n.target != "to" or not n.args or not isinstance(n.args[0], fx.Node):
        return None
    rest, kwargs = n.args[1:], dict(n.kwargs)
    dtype = kwargs.pop("dtype", rest[0] if len(rest) == 1 else None)
    if kwargs or len(rest) > (0 if "dtype" in n.kwargs else 1) or not isinstance(dtype, torch.dtype):
        return None
    return n.args[0], dtype


def _as_dequant_linear(
    gm: fx.GraphModule, node: fx.Node, x: fx.Node, wc: fx.Node, b: Optional[fx.Node]
) -> Optional[Linear]:
    """``linear(x, w.to(dt), b)``, or ``linear(x, w.to(dt)) * s (+ b)`` with
    per-channel scales s: the member's weight is the stored 2-D w."""
    cast = _cast_of(wc)
    if cast is None:
        return None
    w, dtype = cast
    vw = value_of(gm, w)
    if not isinstance(vw, torch.Tensor) or vw.dim() != 2 or vw.dtype == dtype:
        return None
    name = _module_path(node) or node.name
    scaled = _scaled(gm, node, vw.shape[0]) if b is None else None
    if scaled is None:
        return Linear(node, x, w, b, name, dead=(wc,), cast=dtype)
    out, s, b, dead = scaled
    return Linear(out, x, w, b, name, reads=node, dead=(wc, *dead), cast=dtype, scale=s)


_MATMULS = (operator.matmul, torch.matmul)


def _untransposed(gm: fx.GraphModule, n: object) -> Optional[fx.Node]:
    """w if `n` is the transpose of a 2-D tensor w, else None."""
    if not isinstance(n, fx.Node) or not n.args or not isinstance(n.args[0], fx.Node):
        return None
    w, rest = n.args[0], tuple(n.args[1:])
    if n.op == "call_method":
        is_t = (n.target == "t" and not rest) or (
            n.target in ("transpose", "permute") and rest in ((0, 1), (1, 0), (-1, -2), (-2, -1), ((1, 0),))
        )
    elif n.op == "call_function":
        is_t = (n.target is torch.t and not rest) or (n.target is builtins.getattr and rest in (("T",), ("mT",)))
        is_t = is_t or (n.target is torch.transpose and rest in ((0, 1), (1, 0), (-1, -2), (-2, -1)))
    else:
        return None
    if not is_t or n.kwargs:
        return None
    v = value_of(gm, w)
    return w if isinstance(v, torch.Tensor) and v.dim() == 2 else None


def _is_bias_for(gm: fx.GraphModule, b: object, w: fx.Node) -> bool:
    vb, vw = value_of(gm, b) if isinstance(b, fx.Node) else None, value_of(gm, w)
    return (
        isinstance(vb, torch.Tensor) and isinstance(vw, torch.Tensor) and vb.dim() == 1
        and vb.shape[0] == vw.shape[0] and vb.dtype == vw.dtype
    )


def _as_matmul_linear(gm: fx.GraphModule, node: fx.Node) -> Optional[Linear]:
    if node.kwargs or node.op not in ("call_function", "call_method"):
        return None
    if node.op == "call_function" and node.target is torch.addmm and len(node.args) == 3:
        b, x, wt = node.args
        w = _untransposed(gm, wt)
        if w is None or not isinstance(x, fx.Node) or not _is_bias_for(gm, b, w):
            return None
        return Linear(node, x, w, b, _module_path(node) or node.name, dead=(wt,))  # type: ignore[arg-type]
    is_mm = (node.op == "call_function" and node.target in _MATMULS) or (
        node.op == "call_method" and node.target == "matmul"
    )
    if not is_mm or len(node.args) != 2 or not isinstance(node.args[0], fx.Node):
        return None
    w = _untransposed(gm, node.args[1])
    if w is None:
        return None
    x, name = node.args[0], _module_path(node) or node.name
    # Fold a following bias add: ``x @ w.T + b`` is linear(x, w, b).
    if len(node.users) == 1:
        (add,) = node.users
        if add.op == "call_function" and add.target in (operator.add, torch.add) and not add.kwargs:
            args = list(add.args)
            if len(args) == 2 and node in args:
                b = args[1 - args.index(node)]
                if _is_bias_for(gm, b, w):
                    return Linear(add, x, w, b, name, reads=node, dead=(node, node.args[1]))  # type: ignore[arg-type]
    return Linear(node, x, w, None, name, dead=(node.args[1],))  # type: ignore[arg-type]


def find_linears(gm: fx.GraphModule) -> list[Linear]:
    """Every recognised linear call, in graph order."""
    return [lin for n in gm.graph.nodes if (lin := as_linear(gm, n)) is not None]


def count_linears(gm: fx.GraphModule) -> int:
    return len(find_linears(gm))


def siblings(linears: list[Linear]) -> list[list[Linear]]:
    """Linears grouped by their input node; sets of one are dropped.

    Ordered by the first member's position, members in graph order.
    """
    by_input: dict[fx.Node, list[Linear]] = {}
    for lin in linears:
        by_input.setdefault(lin.input, []).append(lin)
    return [sibs for sibs in by_input.values() if len(sibs) > 1]
