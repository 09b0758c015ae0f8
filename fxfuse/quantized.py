"""Quantized tensor-subclass weights (torchao): join siblings' rows, never
dequantize.

torchao's ``quantize_`` replaces each weight by a wrapper tensor subclass
whose inner tensors hold the quantized data, and whose ``linear`` is
torchao's own kernel. Each known layout says, for every inner tensor, which
dim runs over output channels (`Rows`):

    Int8Tensor                qdata [n, K] int8, scale [n, 1], zero_point [n, 1]
    Float8Tensor              qdata [n, K] float8, scale [n, 1]
    Int4TilePackedTo4dTensor  qdata [n/8, K'/128, 32, 4] int32 (tinygemm, CUDA),
                              scale_and_zero [K'/group, n, 2]   (K' = K padded to 1024)
    Int4OpaqueTensor          qdata [n, K/2] uint8 (CPU tinygemm), scale_and_zero [K/group, n, 2]

so the rows of siblings with the same class and the same metadata (block
size, granularity, activation quantization, ...) join, each inner tensor
along its own dim, into one tensor of that class, built through the
subclass protocol:

    fused = Int8Tensor.__tensor_unflatten__(
        {"qdata": [qdata_q | qdata_k | qdata_v], "scale": [...], ...}, ctx, (N, K), (K, 1))

``linear(x, fused)`` then runs torchao's kernel once over the rows, and each
output column is the one the member's own call computes. Nothing is
dequantized or requantized.

Packed int4 rows: the kernels interleave the rows of a tile (CUDA tinygemm:
8 rows per qdata index, tiles of 16 on ROCm; CPU: blocks of 64 rows with
AVX512, 32 with AVX2 or without vectorization, packed apart from the next
block, a shorter last block packed plainly). Joining is exact when every member's rows fill whole
tiles, so that each member's tiles are tiles of the fused tensor; a member
whose rows do not is refused (`not_tile_aligned`).

Storage, where the rows are dim 0 (qdata, per-row scales): each such inner
tensor gets one `Storage` (weights.py), so the members' inner tensors become
row views of the fused ones, with no second copy. ``load_state_dict`` of
quantized weights copies into the inner tensors in place (torchao's
``copy_``); a replaced Parameter, or an inner tensor replaced by
``assign=True``, is caught by the per-call data-pointer check on every such
inner tensor.

Where the rows are another dim (int4's scale_and_zero [K/group, n, 2]), a
member's rows in a joined tensor are a strided slice: not contiguous, which
torchao's linear asserts for the member's own calls, and no other layout
makes both the members' and the fused tensor contiguous. Nor can a copy be
checked for staleness (an edit through ``.data`` leaves the version counter
alone). So the members keep their own tensors, and the compiled graph joins
them on every call (`with_columns`: one ``cat`` per group, inside the graph,
so inside its CUDA graph too; small: K/group * n * 2 values against the
K * n / 2 bytes of packed data). The fused tensor's own inner tensor there
is a placeholder of the right shape that holds no memory and is never read:
exact and never stale, with no extra memory and no host work per call.

Refused, with a reason (legality.py): a class whose inner layout is not
known here (torchao's plain and preshuffled int4 formats, whose kernels need
mslk/fbgemm, are not), siblings of different classes or metadata, inner
tensors that do not hold one row per output channel (per-tensor scales, a
per-input-channel pre-scale): those would have to be equal in every member,
and stay equal after any later update, which no pointer check can promise;
and packed rows that do not fill whole tiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .weights import Storage, concat_rows, storage_for

__all__ = [
    "JOINS_KEY", "LAYOUTS", "Rows", "SubclassStorage", "is_quantized_subclass", "join_rows", "mismatch",
    "row_problem", "static_context", "subclass_storage_for", "with_columns",
]

# Set in a graph's meta by a weight source that stores joined rows (the
# backend's FusedInputs); without it torchao weights are left alone, since
# the graph has no op that concatenates them.
JOINS_KEY = "fxfuse_joins_quantized"


@dataclass(frozen=True)
class Rows:
    """Where an inner tensor keeps the output channels: along `dim`, `per_index`
    channels per index of that dim, interleaved by the packing within tiles
    of `tile` channels (a member's channel count must be a multiple)."""

    dim: int = 0
    per_index: int = 1
    tile: int = 1


# CPU tinygemm (`_convert_weight_to_int4pack_for_cpu`) packs blocks of
# BLOCK_N = 4 * Vectorized<float>::size() rows: 64 with AVX512, 32 with AVX2
# and without vectorization (read in aten/native/cpu/int4mm_kernel.cpp, and
# measured: packing 32-row slices apart gives the same bytes on AVX2). 64 is
# a whole number of blocks on all of them, so it does not depend on the CPU.
_CPU_INT4_TILE = 64

# torchao classes whose layout is known, by name (torchao need not be
# installed for fxfuse to load), and where each inner tensor keeps the
# output channels. Any other inner tensor present refuses the member.
LAYOUTS: dict[str, dict[str, Rows]] = {
    "Int8Tensor": {"qdata": Rows(), "scale": Rows(), "zero_point": Rows()},
    "Float8Tensor": {"qdata": Rows(), "scale": Rows()},
    # Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d"): CUDA's
    # `_weight_int4pack_mm` reads qdata as [n/8][K/(8*16)][32][4], 8 rows an
    # index (torchao's own slice of it divides dim 0 by 8); n is padded to 8.
    # On ROCm the same tensor holds tiles of 16 rows: 16 is exact on both.
    "Int4TilePackedTo4dTensor": {"qdata": Rows(per_index=8, tile=16), "scale_and_zero": Rows(dim=1)},
    # PrototypeInt4WeightOnlyConfig (torchao.prototype.quantization.int4),
    # weight-only: `_weight_int4pack_mm_for_cpu`.
    "Int4OpaqueTensor": {"qdata": Rows(tile=_CPU_INT4_TILE), "scale_and_zero": Rows(dim=1)},
}

# Metadata that differs between siblings by construction: the logical shape
# (int4 tensors keep it), of which only the input features must agree.
_SHAPE_KEY = "shape"


def _qualname(t: object) -> str:
    """The class's name if it is torchao's, else ''."""
    cls = type(t)
    return cls.__qualname__ if cls.__module__.split(".")[0] == "torchao" else ""


def is_quantized_subclass(t: object) -> bool:
    """A wrapper subclass whose rows fxfuse knows how to join."""
    return is_traceable_wrapper_subclass(t) and _qualname(t) in LAYOUTS


def _flatten(t: Tensor) -> tuple[list[str], dict]:
    names, ctx = t.__tensor_flatten__()  # type: ignore[attr-defined]
    return list(names), ctx


def _metadata(ctx: object) -> object:
    """The metadata siblings must share: all but the rows of a logical shape."""
    if isinstance(ctx, dict) and _SHAPE_KEY in ctx:
        return {**ctx, _SHAPE_KEY: tuple(ctx[_SHAPE_KEY])[1:]}
    return ctx


def _layout(t: Tensor) -> dict[str, Rows]:
    return LAYOUTS[_qualname(t)]


def row_problem(w: Tensor) -> Optional[str]:
    """Why the inner tensors of `w` cannot be joined row by row, or None:
    "not_per_row" when one does not hold exactly its output channels along
    its rows dim (a per-tensor scale, a pre-scale of the input channels, a
    nested subclass, padded rows), "not_tile_aligned" when the packing
    interleaves rows in tiles that the output channels do not fill."""
    layout = _layout(w)
    n = w.shape[0]
    names, _ = _flatten(w)
    for name in names:
        inner = getattr(w, name)
        rows = layout.get(name)
        if rows is None or not isinstance(inner, Tensor) or is_traceable_wrapper_subclass(inner):
            return "not_per_row"
        if n % rows.tile:
            return "not_tile_aligned"
        if inner.dim() <= rows.dim or inner.shape[rows.dim] * rows.per_index != n:
            return "not_per_row"
    return None


def _others(t: Tensor, dim: int) -> tuple:
    return tuple(s for i, s in enumerate(t.shape) if i != dim)


def mismatch(a: Tensor, b: Tensor) -> Optional[str]:
    """Why the rows of `b` cannot join those of `a` (both passed
    `row_problem`): "class", "metadata" (block size, granularity, activation
    quantization, ...) or "inner" (inner tensors' names, dtypes, shapes
    other than the rows); None if they can."""
    if type(a) is not type(b):
        return "class"
    (na, ca), (nb, cb) = _flatten(a), _flatten(b)
    try:
        same_ctx = bool(_metadata(ca) == _metadata(cb))
    except Exception:  # noqa: BLE001 - metadata that cannot be compared is not known to be equal
        same_ctx = False
    if not same_ctx:
        return "metadata"
    if na != nb:
        return "inner"
    layout = _layout(a)
    for name in na:
        ia, ib, d = getattr(a, name), getattr(b, name), layout[name].dim
        if ia.dtype != ib.dtype or ia.device != ib.device or _others(ia, d) != _others(ib, d):
            return "inner"
    return None


def _build(ref: Tensor, inner: dict[str, Tensor], n: int) -> Tensor:
    """A tensor of `ref`'s class and metadata, with `n` rows, over the given inner tensors."""
    _, ctx = _flatten(ref)
    size = (n, *ref.shape[1:])
    if isinstance(ctx, dict) and _SHAPE_KEY in ctx:
        ctx = {**ctx, _SHAPE_KEY: torch.Size(size)}
    stride = tuple(int(torch.Size(size)[i + 1:].numel()) for i in range(len(size)))
    return type(ref).__tensor_unflatten__(inner, ctx, size, stride)  # type: ignore[attr-defined]


def _inner_widths(rows: Rows, widths: Sequence[int]) -> list[int]:
    return [w // rows.per_index for w in widths]


class SubclassStorage:
    """One group's quantized weights as one tensor of their class. Its inner
    tensors whose rows are dim 0 each live in one `Storage` (the members'
    inner tensors are row views of them); those joined along another dim
    (`columns`: name -> dim) the compiled graph joins from the members' own
    on every call (`with_columns`; see the module docstring). Same interface
    as `Storage` where `_Slot` and `FusedInputs.wrap` use it; `names` are the
    stored inner tensors, and `ptrs` holds, per member, their expected data
    pointers in that order."""

    def __init__(self, parts: dict[str, Storage], members: Sequence[Tensor], widths: Sequence[int]) -> None:
        ref = members[0]
        self.names = list(parts)
        self.parts = parts
        self.type = type(ref)
        self.all_names, ctx = _flatten(ref)
        self.metadata = _metadata(ctx)
        layout = _layout(ref)
        self.columns = {k: layout[k].dim for k in self.all_names if k not in parts}
        # Stand-ins of the joined shape that hold no memory: the graph reads
        # the members' own tensors instead (`with_columns`).
        unread = {}
        for k, d in self.columns.items():
            t = getattr(ref, k)
            shape = list(t.shape)
            shape[d] = sum(getattr(m, k).shape[d] for m in members)
            unread[k] = t.new_empty(()).expand(shape)
        self.fused = _build(ref, {**{k: st.fused for k, st in parts.items()}, **unread}, sum(widths))
        # What the compiled graph expects of each member's column tensors.
        self._column_meta = [[(getattr(m, k).shape, getattr(m, k).dtype) for k in self.columns] for m in members]

    @property
    def ptrs(self) -> list[tuple[int, ...]]:
        return [tuple(p) for p in zip(*(self.parts[k].ptrs for k in self.names))]

    def fits(self, members: Sequence[Optional[Tensor]]) -> bool:
        if not all(m is not None and type(m) is self.type for m in members):
            return False
        flat = [_flatten(m) for m in members]  # type: ignore[arg-type]
        if not all(names == self.all_names and _metadata(ctx) == self.metadata for names, ctx in flat):
            return False
        device = self.fused.device
        return all(st.fits([getattr(m, k) for m in members]) for k, st in self.parts.items()) and (
            [[(getattr(m, k).shape, getattr(m, k).dtype) for k in self.columns] for m in members] == self._column_meta
            and all(getattr(m, k).device == device for k in self.columns for m in members)
        )

    def current(self, members: Sequence[Optional[Tensor]]) -> Tensor:
        """The fused tensor, after copying back any inner tensor that moved."""
        for k, st in self.parts.items():
            st.current([getattr(m, k) for m in members])
        return self.fused


def with_columns(fused: Tensor, names: tuple, dims: tuple, columns: tuple) -> Tensor:
    """`fused` with its inner tensors `names` replaced by the members' own,
    `columns[i]`, joined along `dims[i]`. Called inside the compiled graph
    (the backend inserts it; see inputs.py), which reads the members' tensors
    on every call: never stale, and the join is one kernel of that graph."""
    inner = {k: getattr(fused, k) for k in _flatten(fused)[0]}
    for k, d, parts in zip(names, dims, columns):
        inner[k] = torch.cat(list(parts), dim=d)
    return _build(fused, inner, fused.shape[0])


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
    tensor whose rows are dim 0, shared with any graph that fused them
    before), or None when one of those cannot move into one (see `storage_for`)."""
    if any(m is None for m in members):
        return None
    present = [m for m in members if m is not None]
    ref = present[0]
    layout = _layout(ref)
    names, _ = _flatten(ref)
    parts: dict[str, Storage] = {}
    for k in names:
        if layout[k].dim != 0:
            continue
        st = storage_for([getattr(m, k) for m in present], _inner_widths(layout[k], widths))
        if st is None:
            return None
        parts[k] = st
    if not parts:
        return None  # nothing stored: nothing to find the fused tensor by
    # Kept on the first inner storage (alive while a member is), so graphs
    # fusing the same group share one fused tensor.
    first = parts[next(iter(parts))]
    known = getattr(first, "subclass", None)
    if isinstance(known, SubclassStorage) and known.parts == parts and known.fits(present):
        known.current(present)
        return known
    first.subclass = SubclassStorage(parts, present, widths)  # type: ignore[attr-defined]
    return first.subclass  # type: ignore[attr-defined]


@torch.no_grad()
def join_rows(members: Sequence[Optional[Tensor]], widths: Sequence[int]) -> Tensor:
    """A new tensor of the members' class holding their rows (a copy: used
    only where the members' inner tensors now belong to another group)."""
    ref = members[0]
    assert ref is not None
    names, _ = _flatten(ref)
    layout = _layout(ref)
    inner = {}
    for k in names:
        rows = layout[k]
        parts = [getattr(m, k) for m in members]
        inner[k] = (concat_rows(parts, _inner_widths(rows, widths)) if rows.dim == 0
                    else torch.cat(parts, dim=rows.dim))
    return _build(ref, inner, sum(widths))
