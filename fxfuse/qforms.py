"""torchao's quantized linears in aten graphs (Inductor's graphs, torch.export
programs), where AOTAutograd has already taken the tensor subclass apart.

torchao 0.18 on CPU spells them (B, S the leading dims, N the output rows):

    Int8WeightOnly        mm(view(x), to(t(qdata), bf16)) * flatten(to(scale, bf16))
    Float8WeightOnly      matmul(x, to(to(t(qdata), f32) * t(scale), bf16))
    Int8DynamicActivation xq, xs = quantize(x)   (choose_qparams_affine +
                          quantize_affine, or amin/amax/round/clamp)
                          to(to(_int_mm(view(xq), t(qdata)), f32) * xs, bf16) * flatten(scale)
                          (on CPUs with VNNI: _int_mm(to(xq + 128, uint8), t(qdata))
                          - sum(t(qdata), 0) * 128, the subtraction in place)
    Float8DynamicActivation (per row)
                          xs = choose_scale_float8(x); xq = to(clamp(x / xs), float8)
                          _scaled_mm(view(xq), t(qdata), view(xs), t(scale), out_dtype=bf16)

with a view back to [B, S, N]; export reads the inner tensors through
``export.access_subclass_inner_tensor(weight, "qdata")``, and with freezing
Inductor has folded what only reads constants (Float8WeightOnly's whole
dequantized weight, a permuted qdata, a flattened scale) into constants.

Each is one `QuantForm`: a GEMM whose weight operand is built from stored
tensors with one row per output channel (qdata [N, K], scale [N, 1] or [N])
by row-wise ops (transpose, cast, multiply, view), followed by column-wise
ops (casts; a multiply or add by a per-column vector built the same way, or
by a value that is one per row of x or one for all, computed from x alone;
the view back), and preceded by what only it computes from x (the
activation's quantization). Output column j then reads only row j of each
stored tensor, so concatenating those rows and running the member's
subgraph once over them computes every member's columns exactly as before;
the activation's quantization, a function of the shared x, is computed
once. Siblings fuse when their subgraphs are equal up to N (`signature`).
A scale that is not one per row (per-tensor) is recognised and refused.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import fx

from .forms import Linear, module_path, value_of

__all__ = ["QuantForm", "as_quantized_linear", "emit_form"]

aten, prims = torch.ops.aten, torch.ops.prims

# torch.export's reader of a subclass parameter's inner tensor (absent from older torch).
ACCESS = getattr(getattr(getattr(torch.ops, "export", None), "access_subclass_inner_tensor", None), "default", None)
_ASSERT = getattr(getattr(aten, "_assert_tensor_metadata", None), "default", None)

_GEMMS = (aten.mm.default, aten._int_mm.default, aten.matmul.default)
# _scaled_mm(a, b, scale_a, scale_b, bias, scale_result, out_dtype, use_fast_accum):
# scale_b is the weight's, one per output column; scale_a the activation's.
_SCALED_MM = aten._scaled_mm.default
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_FLATTEN = aten.flatten.using_ints
# Column-wise epilogue ops; sub_ too: on CPUs with VNNI, torchao runs int8 x int8
# as uint8 x int8 (x + 128) and subtracts 128 * (the weight's column sums) in place.
_BINARY = (aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.sub_.Tensor)
_SUM = aten.sum.dim_IntList

NOT_PER_ROW = "quantized_scales_not_per_row"  # legality.Reason.QUANT_NOT_PER_ROW


@dataclass
class QuantForm:
    """A member's subgraph: its nodes in graph order (activation side,
    weight side, GEMM, column-wise epilogue), the stored tensors it reads
    (`leaves`, N rows each), nodes from outside it reads besides x
    (`shared`: one per row of x, or per tensor), and where each view holds N."""

    gemm: fx.Node
    nodes: list[fx.Node] = field(default_factory=list)
    leaves: list[fx.Node] = field(default_factory=list)
    shared: list[fx.Node] = field(default_factory=list)
    n_at: dict[fx.Node, int] = field(default_factory=dict)  # view -> index of N in its shape
    epilogue: list[fx.Node] = field(default_factory=list)
    core: set[fx.Node] = field(default_factory=set)  # nodes whose values have N: re-propagated when copied
    signature: tuple = ()
    refusal: Optional[str] = None  # a legality.Reason value: recognised, never fused


def readers(node: fx.Node) -> list[fx.Node]:
    """A node's users, without export's dtype checks (which read, never use)."""
    return [u for u in node.users if _ASSERT is None or u.target is not _ASSERT]


def _is_stored(n: fx.Node) -> bool:
    if n.op in ("placeholder", "get_attr"):
        return True
    return ACCESS is not None and n.op == "call_function" and n.target is ACCESS and n.args[0].op == "placeholder"


def _cast_of(n: fx.Node) -> Optional[fx.Node]:
    """x if `n` only converts x to another dtype."""
    if n.op != "call_function" or not n.args or not isinstance(n.args[0], fx.Node):
        return None
    if n.target in (prims.convert_element_type.default, aten.to.dtype) and len(n.args) == 2 and not n.kwargs:
        return n.args[0]
    if n.target is aten._to_copy.default and len(n.args) == 1 and list(n.kwargs) == ["dtype"]:
        return n.args[0]
    return None


def _is_transpose(n: fx.Node) -> bool:
    return n.target is aten.t.default or (n.target is aten.permute.default and list(n.args[1]) in ([1, 0], [-1, -2]))


class _Walk:
    def __init__(self, gm: fx.GraphModule, gemm: fx.Node) -> None:
        self.gm, self.form = gm, QuantForm(gemm)
        self.core: list[fx.Node] = []

    def _val(self, n: object) -> Optional[torch.Tensor]:
        v = value_of(self.gm, n) if isinstance(n, fx.Node) else None
        return v if isinstance(v, torch.Tensor) else None

    def rows(self, n: fx.Node, d: int) -> bool:
        """Is `n` built from stored tensors by row-wise ops, with the output
        channel on its dim `d`? Collects its nodes and leaves."""
        v = self._val(n)
        if v is None or not 0 <= d < v.dim():
            return False
        if _is_stored(n):
            if d != 0 or not all(isinstance(s, int) for s in v.shape):
                return False
            if n not in self.form.leaves:
                self.form.leaves.append(n)
            return True
        if n.op != "call_function" or not isinstance(n.args[0], fx.Node):
            return False
        self.core.append(n)
        if _is_transpose(n) and v.dim() == 2 and len(n.args) <= 2:
            return self.rows(n.args[0], 1 - d)
        if (inner := _cast_of(n)) is not None:
            return self.rows(inner, d)
        if n.target is _SUM and len(n.args) == 3 and n.args[2] is True and set(n.kwargs) <= {"dtype"}:
            # A reduction over other dims, kept: one value per output channel still.
            if d in [r % v.dim() for r in n.args[1]]:
                return False
            return self.rows(n.args[0], d)
        if n.target is aten.mul.Tensor and len(n.args) == 2 and not n.kwargs:
            for o in n.args:
                if isinstance(o, (int, float)) and not isinstance(o, bool):
                    continue  # a constant factor: the same for every row
                vo = self._val(o)
                if vo is None:
                    return False
                do = d - (v.dim() - vo.dim())
                if do < 0 or vo.shape[do] != v.shape[d]:
                    self.form.refusal = NOT_PER_ROW if vo.numel() == 1 or do < 0 or vo.shape[do] == 1 else None
                    return self.form.refusal is not None and self.rows_of_tensor(o)
                if not self.rows(o, do):  # type: ignore[arg-type]
                    return False
            return True
        if n.target in _VIEWS + (_FLATTEN,):
            # Only views between [N], [N, 1], [1, N]: the channel dim moves, nothing else.
            vi = self._val(n.args[0])
            if vi is None or v.numel() != v.shape[d] or vi.numel() != v.shape[d] or v.shape[d] == 1:
                return False
            if n.target in _VIEWS:
                self.form.n_at[n] = d
            return self.rows(n.args[0], list(vi.shape).index(v.shape[d]))
        return False

    def rows_of_tensor(self, n: object) -> bool:
        """A stored tensor under casts and views only: a per-tensor scale of
        the weight (refused), not one computed from x."""
        while isinstance(n, fx.Node) and not _is_stored(n):
            if n.op != "call_function" or not (_cast_of(n) is not None or _is_transpose(n)
                                               or n.target in _VIEWS + (_FLATTEN,)):
                return False
            n = n.args[0]
        return isinstance(n, fx.Node) and n is not self.form.gemm.args[0]

    def epilogue(self, width: int) -> fx.Node:
        """Follow the GEMM's result through column-wise ops; the last one."""
        cur = self.form.gemm
        while len(rs := readers(cur)) == 1:
            u, vc = rs[0], self._val(cur)
            vu = self._val(u)
            if vu is None or vc is None or vu.shape[-1] != width or u.op != "call_function":
                break
            if _cast_of(u) is cur:
                pass
            elif u.target in _BINARY and len(u.args) == 2 and not u.kwargs and cur in u.args:
                if vu.shape != vc.shape:
                    break
                other = u.args[1 - u.args.index(cur)]
                if isinstance(other, fx.Node) and not self._column_operand(other, width):
                    break
            elif u.target in _VIEWS and u.args[0] is cur and len(u.args) == 2 and list(u.args[1])[-1] in (width, -1):
                if not all(isinstance(s, int) or (isinstance(s, fx.Node) and s.op == "placeholder")
                           for s in u.args[1]):
                    break
                if u.args[1][-1] == width:
                    self.form.n_at[u] = len(u.args[1]) - 1
            else:
                break
            self.form.epilogue.append(u)
            self.core.append(u)
            cur = u
            if u.target in _VIEWS:
                break  # the view back ends the linear: what follows is the model's
        # A cast last is the model's too (``silu(w1(x).float())``), not the
        # linear's: siblings that differ there must still join.
        while self.form.epilogue and _cast_of(self.form.epilogue[-1]) is not None:
            self.core.remove(self.form.epilogue.pop())
        return self.form.epilogue[-1] if self.form.epilogue else self.form.gemm

    def _column_operand(self, other: fx.Node, width: int) -> bool:
        vo = self._val(other)
        if vo is None:
            return False
        if vo.dim() >= 1 and vo.shape[-1] == width and vo.numel() == width:
            # A per-column scale (or bias) of stored rows; if it is not, what
            # the walk collected is not this member's.
            kept = len(self.core), len(self.form.leaves), dict(self.form.n_at)
            if self.rows(other, vo.dim() - 1):
                return True
            del self.core[kept[0]:], self.form.leaves[kept[1]:]
            self.form.n_at = kept[2]
            return False
        if vo.dim() == 0 or vo.shape[-1] == 1:
            if self.rows_of_tensor(other):  # a stored per-tensor scale
                self.form.refusal = NOT_PER_ROW
            else:
                self.form.shared.append(other)  # one per row of x, or per tensor: from x
            return True
        return False


def _is_pure(n: fx.Node) -> bool:
    if n.op != "call_function":
        return False
    if n.target is operator.getitem:
        return True
    t = n.target
    return isinstance(t, torch._ops.OpOverload) and not t._schema.is_mutable and not (
        {torch.Tag.nondeterministic_seeded, torch.Tag.nondeterministic_bitwise} & set(t.tags))


def _position(n: fx.Node) -> object:
    """A node's place in its graph: fx keeps `_sort_key` up to date on
    insertion; without it (older torch), its index."""
    key = getattr(n, "_sort_key", None)
    return key if key is not None else list(n.graph.nodes).index(n)


def _activation_side(walk: _Walk) -> Optional[fx.Node]:
    """Add what only this member computes from x (its quantization of x) to
    the form; return x, the node the siblings share, or None."""
    form = walk.form
    inside = set(walk.core) | {form.gemm}
    a = form.gemm.args[0]
    pending, seen, took = [a, *form.shared], {a, *form.shared}, set()
    changed = True
    while changed:  # a node joins once all its readers are in: latest first
        changed = False
        for n in sorted(pending, key=_position, reverse=True):
            if n in took or n in inside or _is_stored(n) or not _is_pure(n):
                continue
            if all(u in inside or u in took for u in readers(n)):
                took.add(n)
                changed = True
                new = [i for i in n.all_input_nodes if i not in seen]
                seen.update(new)
                pending += new
    outside = {i for n in took for i in n.all_input_nodes if i not in took}
    if a not in took:
        x = a
    else:
        xs = {i for i in outside if i not in form.leaves}
        if len(xs) != 1:
            return None  # x and something else: not one input the siblings share
        (x,) = xs
    if any(n in took for n in form.shared):
        form.shared = [i for i in outside if i is not x and i not in form.leaves]
    form.nodes = sorted(took | inside, key=_position)
    form.core = inside
    return x


def _signature(form: QuantForm, x: fx.Node) -> tuple:
    """The subgraph up to N: ops, constants, and which node each reads."""
    index = {n: i for i, n in enumerate(form.nodes)}
    leaf = {n: i for i, n in enumerate(form.leaves)}

    def key(a: object) -> object:
        if isinstance(a, fx.Node):
            if a is x:
                return ("x",)
            if a in index:
                return ("node", index[a])
            if a in leaf:
                return ("leaf", leaf[a], str(value_of_dtype(a)))
            return ("shared", a)
        if isinstance(a, (list, tuple)):
            return tuple(key(b) for b in a)
        if isinstance(a, dict):
            return tuple(sorted((k, key(v)) for k, v in a.items()))
        return a

    out = []
    for n in form.nodes:
        args = list(n.args)
        if n in form.n_at:
            shape = list(args[1])
            shape[form.n_at[n]] = "N"
            args[1] = shape
        out.append((n.target, key(tuple(args)), key(dict(n.kwargs))))
    return tuple(out)


def value_of_dtype(n: fx.Node) -> object:
    v = n.meta.get("val")
    return getattr(v, "dtype", None)


def as_quantized_linear(gm: fx.GraphModule, node: fx.Node, cast_only: bool = False) -> Optional[Linear]:
    """The `Linear` view of a GEMM of one of torchao's forms, or None.
    `cast_only`: also a GEMM over a mere cast of stored rows (int8 weight-only),
    which aten.py's dequantized form covers where its scales are stored."""
    operands = _gemm_operands(node)
    if operands is None:
        return None
    a, wt, scale_w, scale_a = operands
    va, vw = value_of(gm, a), value_of(gm, wt)
    if not (isinstance(a, fx.Node) and isinstance(wt, fx.Node) and isinstance(va, torch.Tensor)
            and isinstance(vw, torch.Tensor) and vw.dim() == 2):
        return None
    width = vw.shape[1]
    walk = _Walk(gm, node)
    if not isinstance(width, int) or width < 2 or not walk.rows(wt, 1):
        return None
    form = walk.form
    if scale_w is not None and not _weight_scale(walk, scale_w, width):
        return None
    if scale_a is not None:
        form.shared.append(scale_a)  # from x: the activation side takes it (or it is not one x)
    weight = next((n for n in form.leaves if value_of(gm, n).dim() == 2  # type: ignore[union-attr]
                   and value_of(gm, n).shape[1] == vw.shape[0]), None)  # type: ignore[union-attr]
    quantized = cast_only or node.target is not aten.mm.default or any(
        n.target is aten.mul.Tensor for n in walk.core) or any(n.op == "call_function" for n in form.leaves)
    if weight is None or not quantized or (cast_only and value_of(gm, weight).dtype.itemsize != 1):  # type: ignore[union-attr]
        return None  # a plain or int8-cast weight: aten.py's forms
    result = walk.epilogue(width)
    x = _activation_side(walk)
    if x is None:
        return None
    form.signature = _signature(form, x)
    extra = tuple(n for n in form.leaves if n is not weight)
    dead = tuple(n for n in form.nodes if n is not result)
    dead += tuple(u for n in (*dead, *form.leaves) for u in n.users if u not in dead and u not in readers(n))
    return Linear(result, x, weight, None, module_path(node) or node.name, reads=node, dead=dead,
                  form=form, extra=extra)


def _gemm_operands(node: fx.Node) -> Optional[tuple]:
    """(x side, weight side, the weight's per-column scale, the activation's
    scale) of a GEMM fxfuse knows, or None."""
    if node.op != "call_function":
        return None
    if node.target in _GEMMS and len(node.args) == 2 and not node.kwargs:
        return (*node.args, None, None)
    if node.target is _SCALED_MM and not node.kwargs and len(node.args) >= 4:
        bias, scale_result = (list(node.args[4:6]) + [None, None])[:2]
        if bias is None and scale_result is None:  # a bias or output scale: not a form here
            return node.args[0], node.args[1], node.args[3], node.args[2]
    return None


def _weight_scale(walk: _Walk, scale: object, width: int) -> bool:
    """Is `_scaled_mm`'s scale_b one per output column, from stored rows?
    One for the whole weight is recognised and refused (`NOT_PER_ROW`)."""
    v = walk._val(scale)
    if not isinstance(scale, fx.Node) or v is None:
        return False
    if v.numel() == 1:
        if not walk.rows_of_tensor(scale):
            return False
        walk.form.refusal = NOT_PER_ROW
        return True
    return v.dim() == 2 and tuple(v.shape) == (1, width) and walk.rows(scale, 1)


def emit_form(graph: fx.Graph, member: Linear, fused: dict[str, fx.Node], n_total: int) -> list[fx.Node]:
    """Insert `member`'s subgraph once, over the fused stored tensors (at the
    graph's insert point); return its GEMM, then its epilogue's nodes."""
    form: QuantForm = member.form
    env: dict[fx.Node, fx.Node] = {member.weight: fused["weight"]}  # type: ignore[dict-item]
    env.update({e: fused[f"extra_{i}"] for i, e in enumerate(member.extra)})  # type: ignore[misc]
    for n in form.nodes:
        new = graph.node_copy(n, lambda a: env.get(a, a))
        if n in form.n_at:
            shape = list(new.args[1])  # type: ignore[arg-type]
            shape[form.n_at[n]] = n_total
            new.args = (new.args[0], shape, *new.args[2:])
        env[n] = new
        if n in form.core:
            _propagate(new)
    return [env[form.gemm], *(env[n] for n in form.epilogue)]


def _propagate(node: fx.Node) -> None:
    """The copy's fake value, from its inputs' (its own shape has N_total rows)."""
    vals = [a.meta.get("val") for a in node.all_input_nodes]
    mode = next((getattr(v, "fake_mode", None) for v in vals if getattr(v, "fake_mode", None) is not None), None)
    if mode is None or not all(isinstance(v, torch.Tensor) for v in vals):
        node.meta.pop("val", None)
        return
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: a.meta["val"])
    with mode:
        node.meta["val"] = node.target(*args, **kwargs)  # type: ignore[operator]
