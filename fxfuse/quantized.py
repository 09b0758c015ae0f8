"""Quantized tensor-subclass weights (torchao): join siblings' rows, never
dequantize.

torchao's ``quantize_`` replaces each weight by a wrapper tensor subclass
whose inner tensors hold the quantized data, and whose ``linear`` is
torchao's own kernel. For the per-row layouts every inner tensor holds one
row per output channel:

    Int8Tensor    qdata [n, K] int8, scale [n, 1], zero_point [n, 1]
    Float8Tensor  qdata [n, K] float8, scale [n, 1]

so the rows of siblings with the same class and the same metadata (block
size, granularity, activation quantization, ...) stack into one tensor of
that class, built through the subclass protocol:

    fused = Int8Tensor.__tensor_unflatten__(
        {"qdata": [qdata_q | qdata_k | qdata_v], "scale": [...], ...}, ctx, (N, K), (K, 1))

``linear(x, fused)`` then runs torchao's kernel once over the rows, and each
output column is the one the member's own call computes. Nothing is
dequantized or requantized.

Storage: each inner tensor (qdata, scale, zero point) gets one `Storage`
(weights.py), so the members' inner tensors become row views of the fused
inner tensors, with no second copy. ``load_state_dict`` of quantized
weights copies into the inner tensors in place (torchao's ``copy_``); a
replaced Parameter, or an inner tensor replaced by ``assign=True``, is
caught by the per-call data-pointer check on every inner tensor.

Refused, with a reason (legality.py): a class whose inner layout is not
known here, siblings of different classes or metadata, and inner tensors
that do not hold one row per output channel (per-tensor scales, a
per-input-channel pre-scale): those would have to be equal in every member,
and stay equal after any later update, which no pointer check can promise.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .weights import Storage, concat_rows, storage_for

__all__ = [
    "JOINS_KEY", "ROW_TENSORS", "SubclassStorage", "is_quantized_subclass", "join_rows", "mismatch",
    "not_per_row", "static_context", "subclass_storage_for",
]

# Set in a graph's meta by a weight source that stores joined rows (the
# backend's FusedInputs); without it torchao weights are left alone, since
# the graph has no op that concatenates them.
JOINS_KEY = "fxfuse_joins_quantized"

# torchao classes whose layout is known, by name (torchao need not be
# installed for fxfuse to load), and their inner tensors holding one row per
# output channel along dim 0. Any other inner tensor present refuses the member.
ROW_TENSORS: dict[str, tuple[str, ...]] = {
    "Int8Tensor": ("qdata", "scale", "zero_point"),
    "Float8Tensor": ("qdata", "scale"),
}


def _qualname(t: object) -> str:
    """The class's name if it is torchao's, else ''."""
    cls = type(t)
    return cls.__qualname__ if cls.__module__.split(".")[0] == "torchao" else ""


def is_quantized_subclass(t: object) -> bool:
    """A wrapper subclass whose rows fxfuse knows how to join."""
    return is_traceable_wrapper_subclass(t) and _qualname(t) in ROW_TENSORS


def _flatten(t: Tensor) -> tuple[list[str], dict]:
    names, ctx = t.__tensor_flatten__()  # type: ignore[attr-defined]
    return list(names), ctx


def not_per_row(w: Tensor) -> bool:
    """Does some inner tensor of `w` not hold exactly one row per output
    channel (a per-tensor scale, a pre-scale of the input channels, a nested
    subclass)?"""
    rows = ROW_TENSORS[_qualname(w)]
    names, _ = _flatten(w)
    for name in names:
        inner = getattr(w, name)
        if name not in rows or not isinstance(inner, Tensor) or is_traceable_wrapper_subclass(inner):
            return True
        if inner.dim() == 0 or inner.shape[0] != w.shape[0]:
            return True
    return False


def mismatch(a: Tensor, b: Tensor) -> Optional[str]:
    """Why the rows of `b` cannot join those of `a` (both passed
    `not_per_row`): "class", "metadata" (block size, granularity, activation
    quantization, ...) or "inner" (inner tensors' names, dtypes, trailing
    shapes); None if they can."""
    if type(a) is not type(b):
        return "class"
    (na, ca), (nb, cb) = _flatten(a), _flatten(b)
    try:
        same_ctx = bool(ca == cb)
    except Exception:  # noqa: BLE001 - metadata that cannot be compared is not known to be equal
        same_ctx = False
    if not same_ctx:
        return "metadata"
    if na != nb:
        return "inner"
    for name in na:
        ia, ib = getattr(a, name), getattr(b, name)
        if ia.dtype != ib.dtype or ia.device != ib.device or tuple(ia.shape[1:]) != tuple(ib.shape[1:]):
            return "inner"
    return None


def _build(ref: Tensor, inner: dict[str, Tensor]) -> Tensor:
    """A tensor of `ref`'s class and metadata over the given inner tensors."""
    _, ctx = _flatten(ref)
    n = inner["qdata"].shape[0]
    size = (n, *ref.shape[1:])
    stride = tuple(int(torch.Size(size)[i + 1:].numel()) for i in range(len(size)))
    return type(ref).__tensor_unflatten__(inner, ctx, size, stride)  # type: ignore[attr-defined]


class SubclassStorage:
    """One group's quantized weights as one tensor of their class, whose
    inner tensors each live in one `Storage` (the members' inner tensors are
    row views of them). Same interface as `Storage` where `_Slot` and
    `FusedInputs.wrap` use it; `ptrs` holds, per member, its inner tensors'
    expected data pointers in `names` order."""

    def __init__(self, parts: dict[str, Storage], ref: Tensor) -> None:
        self.names = list(parts)
        self.parts = parts
        self.type = type(ref)
        self.ctx = _flatten(ref)[1]
        self.fused = _build(ref, {k: st.fused for k, st in parts.items()})

    @property
    def ptrs(self) -> list[tuple[int, ...]]:
        return [tuple(p) for p in zip(*(self.parts[k].ptrs for k in self.names))]

    def fits(self, members: Sequence[Optional[Tensor]]) -> bool:
        return all(
            m is not None and type(m) is self.type and _flatten(m) == (self.names, self.ctx) for m in members
        ) and all(st.fits([getattr(m, k) for m in members]) for k, st in self.parts.items())

    def current(self, members: Sequence[Optional[Tensor]]) -> Tensor:
        """The fused tensor, after copying back any inner tensor that moved."""
        for k, st in self.parts.items():
            st.current([getattr(m, k) for m in members])
        return self.fused


def static_context(t: Tensor, source: object) -> object:
    """A symbolic context giving `t` and each of its inner tensors static
    shapes. AOTAutograd fakifies a subclass input afresh, inner tensors with
    symbolic sizes unless the tracing context has a context for it; a fused
    weight's shape is known, and symbols there would make Inductor emit
    kernels for any size (and its cache key could not be pickled)."""
    from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext, SubclassSymbolicContext

    def static(n: int) -> dict:
        return {"dynamic_sizes": [DimDynamic.STATIC] * n, "constraint_sizes": [None] * n}

    inner = {k: StatelessSymbolicContext(**static(getattr(t, k).dim())) for k in _flatten(t)[0]}
    return SubclassSymbolicContext(**static(t.dim()), tensor_source=source, inner_contexts=inner,
                                   shape_env_to_source_to_symbol_cache={})


def subclass_storage_for(members: Sequence[Optional[Tensor]], widths: Sequence[int]) -> Optional[SubclassStorage]:
    """The storage of these quantized weights (one `Storage` per inner
    tensor, shared with any graph that fused them before), or None when one
    of their inner tensors cannot move into one (see `storage_for`)."""
    if any(m is None for m in members):
        return None
    ref = members[0]
    assert ref is not None
    names, _ = _flatten(ref)
    parts: dict[str, Storage] = {}
    for k in names:
        st = storage_for([getattr(m, k) for m in members], widths)
        if st is None:
            return None
        parts[k] = st
    # Kept on the first inner storage (alive while a member is), so graphs
    # fusing the same group share one fused tensor.
    first = parts[names[0]]
    known = getattr(first, "subclass", None)
    if isinstance(known, SubclassStorage) and known.parts == parts:
        return known
    first.subclass = SubclassStorage(parts, ref)  # type: ignore[attr-defined]
    return first.subclass  # type: ignore[attr-defined]


@torch.no_grad()
def join_rows(members: Sequence[Optional[Tensor]], widths: Sequence[int]) -> Tensor:
    """A new tensor of the members' class holding their rows (a copy: used
    only where the members' inner tensors now belong to another group)."""
    ref = members[0]
    assert ref is not None
    names, _ = _flatten(ref)
    return _build(ref, {k: concat_rows([getattr(m, k) for m in members], widths) for k in names})
