"""Fused weights live in one storage: concatenated once, no second copy,
never stale.

A group's member weights (or biases) are copied once into one contiguous
tensor, and each member's ``.data`` becomes its row slice of it:

    fused = [ wq | wk | wv ]      (one allocation, rows stacked)
    wq.data = fused[0:nq]; wk.data = fused[nq:nq+nk]; ...

The Parameters stay the same Python objects with the same shapes and strides,
so state_dict, optimizers, hooks and named_parameters keep working; in-place
updates (``mul_``, ``copy_``, ``load_state_dict``, optimizer steps) write
straight into the fused tensor. What can still move a member elsewhere (a new
Parameter object, ``load_state_dict(assign=True)``, ``.data =``,
``model.to(...)``) is caught by `Storage.current`, which compares data
pointers on every call and copies the moved members back in before the
compiled code runs.

Memory: the old member storages are freed as soon as each member is
re-pointed, so the peak while fusing is one group's size above the model,
and nothing is left over afterwards.

The registry maps each member tensor (weakly) to its storage, so two compiled
graphs that fuse the same group share one fused tensor, and a tensor is never
claimed by two different groups (one storage cannot hold it twice).
"""

from __future__ import annotations

import math
import weakref
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils.weak import WeakIdKeyDictionary

from .dtensor import is_dtensor, local_value, repoint

__all__ = ["Storage", "concat_rows", "release", "storage_for", "unfuse"]

# member tensor -> Storage holding it. The Storage (and so the fused tensor) is
# alive while a member is; compiled graphs hold only weak references to it, so
# after `model.to(dtype)` the old fused tensor goes once the group is re-fused.
_REGISTRY: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


class Storage:
    """One group's member tensors (None: a missing bias, kept as zeros) as row
    slices of one contiguous tensor, `fused`."""

    def __init__(self, members: Sequence[Optional[Tensor]], widths: Sequence[int]) -> None:
        ref = local_value(next(m for m in members if m is not None))
        self.widths = list(widths)
        self.offsets = [sum(self.widths[:i]) for i in range(len(self.widths))]
        self.fused = torch.empty(
            (sum(self.widths), *ref.shape[1:]), dtype=ref.dtype, device=ref.device
        )
        self._members: list[Optional[weakref.ref]] = [None] * len(members)
        self.ptrs = [0] * len(members)
        with torch.no_grad():
            for i, m in enumerate(members):
                if m is None:
                    self._slice(i).zero_()
                else:
                    self._adopt(i, m)

    def _slice(self, i: int) -> Tensor:
        return self.fused[self.offsets[i] : self.offsets[i] + self.widths[i]]

    def _adopt(self, i: int, member: Tensor) -> None:
        """Copy `member` into its slice and make it a view of the slice (of a
        tensor-parallel shard: its local tensor, see dtensor.py)."""
        piece = self._slice(i)
        if local_value(member).data_ptr() != piece.data_ptr():
            piece.copy_(local_value(member))
            if is_dtensor(member):
                # With autograd hooks it keeps its own storage: correct, but
                # copied in again on every call.
                repoint(member, piece)
            else:
                member.data = piece
        self._members[i] = weakref.ref(member)
        self.ptrs[i] = piece.data_ptr()
        _REGISTRY[member] = self

    def position(self, member: Tensor) -> int:
        return next((i for i, r in enumerate(self._members) if r is not None and r() is member), -1)

    def fits(self, members: Sequence[Optional[Tensor]]) -> bool:
        """Could these tensors be copied into this storage as they are?"""
        local = [local_value(m) for m in members]
        return len(members) == len(self.widths) and all(
            m is None
            or (m.dtype == self.fused.dtype and m.device == self.fused.device
                and tuple(m.shape) == (w, *self.fused.shape[1:]))
            for m, w in zip(local, self.widths)
        )

    def current(self, members: Sequence[Optional[Tensor]]) -> Tensor:
        """The fused tensor, after copying back any member that moved."""
        with torch.no_grad():
            for i, (m, p) in enumerate(zip(members, self.ptrs)):
                if m is not None and local_value(m).data_ptr() != p:
                    self._adopt(i, m)
        return self.fused


@torch.no_grad()
def concat_rows(members: Sequence[Optional[Tensor]], widths: Sequence[int]) -> Tensor:
    """The members stacked along dim 0 in a new tensor; None (a missing bias)
    counts as zeros of its width."""
    ref = local_value(next(m for m in members if m is not None))
    if _quantized(ref):
        from .quantized import join_rows

        return join_rows(members, widths)
    return torch.cat([local_value(m) if m is not None else ref.new_zeros((w, *ref.shape[1:]))
                      for m, w in zip(members, widths)])


def _quantized(t: object) -> bool:
    return is_traceable_wrapper_subclass(t) and not is_dtensor(t)


def _plain(t: Tensor) -> bool:
    # Exactly the strides of its slice of the storage: a [1, K] tensor made by
    # a transpose is "contiguous" with strides (1, 1), and Dynamo guards strides.
    expected = tuple(math.prod(t.shape[i + 1:]) for i in range(t.dim()))
    return type(t) in (Tensor, torch.nn.Parameter, torch.nn.Buffer) and t.stride() == expected


def storage_for(members: Sequence[Optional[Tensor]], widths: Sequence[int]) -> Optional[Storage]:
    """The storage holding these tensors, made (once) if needed, or None when
    they cannot share one: a repeated or non-contiguous tensor, or a tensor
    that another group's storage still backs (one tensor has one home)."""
    present = [m for m in members if m is not None]
    if present and _quantized(present[0]):  # torchao: one storage per inner tensor (quantized.py)
        from .quantized import subclass_storage_for

        return subclass_storage_for(members, widths) if len({id(m) for m in present}) == len(members) else None  # type: ignore[return-value]
    if not present or len({id(m) for m in present}) != len(present) or not all(_plain(local_value(m)) for m in present):
        return None
    owners = {id(s): s for m in present if (s := _REGISTRY.get(m)) is not None}
    if len(owners) == 1:
        (owner,) = owners.values()
        # The same group, maybe with some members replaced by new tensors.
        if owner.fits(members) and all(
            _REGISTRY.get(m) is None or owner.position(m) == i for i, m in enumerate(members) if m is not None
        ):
            owner.current(members)
            return owner
    if any(_still_owns(o, present) for o in owners.values()):
        return None
    return Storage(members, widths)


def _still_owns(storage: Storage, tensors: list[Tensor]) -> bool:
    """Does `storage` still back one of `tensors` (so re-fusing would steal it)?"""
    return any(
        r is not None and r() is t and local_value(t).data_ptr() == p
        for t in tensors
        for r, p in zip(storage._members, storage.ptrs)
    )


@torch.no_grad()
def unfuse(module: torch.nn.Module) -> int:
    """Give every fused parameter and buffer of `module` its own storage again.

    Use it before saving with a format that refuses shared storage (e.g.
    safetensors). Compiled models keep working: they re-fuse on their next
    call. Returns the number of tensors moved.
    """
    moved = 0
    tensors = list(module.parameters()) + list(module.buffers())
    # A quantized weight's inner tensors are what its storage holds (quantized.py).
    tensors += [getattr(t, k) for t in tensors if _quantized(t) for k in t.__tensor_flatten__()[0]]
    for t in tensors:
        if _REGISTRY.get(t) is not None and _move_out(t):
            moved += 1
    return moved


@torch.no_grad()
def release(storage: Storage) -> int:
    """Give the members of `storage` their own memory again: the rewrite
    that made it failed and was undone (see inputs.FusedInputs.rollback)."""
    parts = getattr(storage, "parts", None)
    if parts is not None:  # torchao weights: one storage per inner tensor (quantized.py)
        return sum(release(p) for p in parts.values())
    members = [r() for r in storage._members if r is not None]
    return sum(_move_out(t) for t in members if t is not None and _REGISTRY.get(t) is storage)


def _move_out(t: Tensor) -> bool:
    """Copy `t` out of its storage into memory of its own."""
    if not is_dtensor(t):
        t.data = t.data.clone()
    elif not repoint(t, local_value(t).clone()):
        return False  # autograd hooks on it: left where it is (see dtensor.repoint)
    del _REGISTRY[t]
    return True
