"""`guard_filter`: Dynamo's Python guards on the quantized weights fxfuse
took over, left out.

Dynamo guards every parameter a compiled frame reads, on every call. For a
plain tensor that is one check in C++. For a torchao weight (a tensor
subclass) two more run in Python, and each calls the subclass's
``__tensor_flatten__``: one compares its metadata (block size, dtypes, the
activation quantization), one the names of its inner tensors. They are most
of a quantized model's guard time, and fusing happens after Dynamo, so a
fused model pays them for every member (benchmarks/guard_check.py: 16 int8
layers, about 550 µs per call, 260 µs with this filter; docs/benchmarks.md).

For the members whose inner tensors fxfuse moved into a storage, the
compiled graph never reads the member: it reads the fused tensor, and the
wrapper in inputs.py checks on every call that each member's inner tensors
still lie in their slices. Whenever one moved (the weight was replaced,
swapped or loaded with ``assign=True``), it checks the member's class and
metadata against what was compiled and raises `QuantizedWeightChanged`
rather than run a graph built for other metadata. So for those members
alone the two Python guards can go; their C++ guards (class, shape, dtype,
strides, device, requires_grad, of the weight and of each inner tensor)
stay. What is then not seen is metadata assigned in place on a weight
object that stays where it is (``w.block_size = ...``).

    torch.compile(model, backend="fxfuse", options={"guard_filter_fn": fxfuse.guard_filter})

The filter only acts inside a compile where the fxfuse backend took
weights over, on those weights, and never on one that any graph of that
compile reads itself. ``counters["fxfuse"]["python_guards_skipped"]``
counts the guards it left out.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any, Optional, Sequence

from torch import Tensor

__all__ = ["QuantizedWeightChanged", "guard_filter"]

_METADATA = "TENSOR_SUBCLASS_METADATA_MATCH"
_NAMES = "EQUALS_MATCH"  # on `<weight>.__tensor_flatten__()[0]`


class QuantizedWeightChanged(RuntimeError):
    """A quantized weight that fxfuse fused now has other quantization
    metadata than when it was compiled, and Dynamo did not recompile
    (its guard on that was left out, by `guard_filter` or another filter)."""


class _Compile:
    """The weights the backend took over and those the graphs read, for the
    compile running now (one at a time: the filter runs at its end)."""

    def __init__(self) -> None:
        self.context: Optional[object] = None  # the CompileContext: ids repeat after a reset
        self.taken: dict[int, weakref.ref] = {}
        self.read: set[int] = set()

    def _now(self) -> bool:
        from torch._guards import CompileContext

        context = CompileContext.try_get()
        if context is None or context.compile_id is None:
            return False
        if context is not self.context:
            self.context, self.taken, self.read = context, {}, set()
        return True

    def took(self, weights: Sequence[Tensor]) -> None:
        if self._now():
            self.taken.update((id(t), weakref.ref(t)) for t in weights)

    def reads(self, tensors: Sequence[Any]) -> None:
        if self._now():
            self.read.update(id(t) for t in tensors if isinstance(t, Tensor))

    def unread(self) -> dict[int, Tensor]:
        """Taken by this compile and read by none of its graphs."""
        if not self._now():
            return {}
        alive = {i: r() for i, r in self.taken.items() if i not in self.read}
        return {i: t for i, t in alive.items() if t is not None}


COMPILE = _Compile()


def guard_filter(entries: Sequence[Any]) -> list[bool]:
    """A ``guard_filter_fn`` for torch.compile: keep every guard but the two
    Python guards on each quantized weight fxfuse took over (module docstring)."""
    unread = COMPILE.unread()
    weights = {e.name for e in entries
               if e.guard_type == _METADATA and e.has_value and unread.get(id(e.value)) is e.value}
    names = {f"{w}.__tensor_flatten__()[0]" for w in weights}
    keep = [not ((e.guard_type == _METADATA and e.name in weights) or (e.guard_type == _NAMES and e.name in names))
            for e in entries]
    skipped = keep.count(False)
    if skipped:
        from torch._dynamo.utils import counters

        counters["fxfuse"]["python_guards_skipped"] += skipped
    return keep


def signature(t: Tensor) -> tuple:
    """What the two guards compare: class, inner tensor names, metadata."""
    names, ctx = t.__tensor_flatten__()  # type: ignore[attr-defined]
    return type(t), list(names), copy.deepcopy(ctx)


def check_unchanged(t: Tensor, compiled: tuple, what: str) -> None:
    """Raise `QuantizedWeightChanged` if `t` no longer has the signature it
    was compiled with."""
    cls, names, ctx = compiled
    now_names, now_ctx = t.__tensor_flatten__()  # type: ignore[attr-defined]
    same = type(t) is cls and list(now_names) == names
    if same:
        custom = getattr(cls, "__metadata_guard__", None)  # a subclass's own comparison, as Dynamo uses it
        same = bool(custom(ctx, now_ctx)) if custom is not None else now_ctx == ctx
    if not same:
        raise QuantizedWeightChanged(
            f"fxfuse: {what} is now a {type(t).__name__} with other quantization metadata than the one this "
            "graph was compiled for, and Dynamo did not recompile (a guard filter left that check out). "
            "Call torch.compiler.reset() and compile again, or compile without the guard filter.")
