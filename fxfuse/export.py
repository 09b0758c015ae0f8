"""fxfuse for torch.export: `fuse_exported(ep)` returns a new ExportedProgram
whose sibling linears run as one GEMM each.

Each group's weights (and biases, scales) become one new parameter of the
program, concatenated once: a real entry of the graph signature and the state
dict, so nothing is concatenated per call, in Python or in an AOTInductor
binary. The members' own parameters, now unread, leave the signature and the
state dict, so the program holds no second copy. The new parameters are named
``fxfuse.fused_<i>.<weight|bias|scale>``.

    ep = torch.export.export(model, (tokens,))
    fused = fxfuse.fuse_exported(ep)
    fused.module()(tokens)                       # same outputs
    torch._inductor.aoti_compile_and_package(fused)
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Union

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

from .config import FuseConfig
from .fuse import _fuse
from .forms import Group, stored_operands
from .legality import Reason, check_per_call_concat
from .qforms import ACCESS
from .report import FuseReport
from .weights import concat_rows

__all__ = ["fuse_exported"]

_STORED = (InputKind.PARAMETER, InputKind.BUFFER)


# export checks the dtype of what a cast reads (int8 weights) with
# _assert_tensor_metadata; a member the program no longer reads needs no check.
_ASSERT = getattr(getattr(torch.ops.aten, "_assert_tensor_metadata", None), "default", None)


def _is_assert(node: fx.Node) -> bool:
    return _ASSERT is not None and node.target is _ASSERT


def _readers(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not _is_assert(u)]


class _ExportedWeights:
    """Weight source: concatenate parameter/buffer members into new parameters."""

    def __init__(self, gm: fx.GraphModule, ep: ExportedProgram, specs: list[InputSpec]) -> None:
        self.gm, self.ep, self.specs = gm, ep, specs
        self.spec_of = {s.arg.name: s for s in specs if isinstance(s.arg, TensorArgument)}
        self.replaced: set[str] = set()  # targets of members now read through a fused parameter
        self.new_state: dict[str, torch.Tensor] = {}
        self.count = 0

    def _stored(self, op: Any) -> Optional[tuple[fx.Node, str, Optional[str]]]:
        """(placeholder, its state-dict target, inner tensor name or None) for a
        parameter or buffer the program reads only here; a torchao weight's
        inner tensor is read through ``access_subclass_inner_tensor``."""
        inner = None
        if isinstance(op, fx.Node) and ACCESS is not None and op.target is ACCESS:
            if len(_readers(op)) != 1:
                return None
            op, inner = op.args[0], op.args[1]
        elif not (isinstance(op, fx.Node) and len(_readers(op)) == 1):
            return None
        spec = self.spec_of.get(op.name) if op.op == "placeholder" else None
        if spec is None or spec.kind not in _STORED:
            return None
        return op, spec.target, inner  # type: ignore[return-value]

    def _tensor(self, op: Any) -> Optional[torch.Tensor]:
        found = self._stored(op)
        if found is None:
            return None
        t = self.ep.state_dict.get(found[1])
        t = getattr(t, found[2], None) if found[2] is not None else t
        return t if isinstance(t, torch.Tensor) else None

    def __call__(self, gm: fx.GraphModule, group: Group) -> Union[dict[str, fx.Node], Reason, None]:
        if len(group.members) < 2:
            return None
        nodes: dict[str, fx.Node] = {}
        plans = []
        for kind in stored_operands(group.members[0]):
            ops = [stored_operands(m)[kind] for m in group.members]
            if all(o is None for o in ops):
                continue
            tensors = [None if o is None else self._tensor(o) for o in ops]
            if any(o is not None and t is None for o, t in zip(ops, tensors)):
                # Computed in the graph, or read elsewhere: concatenate in the
                # graph, except torchao's rows (check_per_call_concat).
                return check_per_call_concat(gm, group) if group.members[0].form is not None else None
            plans.append((kind, ops, tensors))
        for kind, ops, tensors in plans:
            fused = concat_rows(tensors, group.widths)
            target = f"fxfuse.fused_{self.count}.{kind}"
            nodes[kind] = self._add_parameter(target, fused, ops)
            self.new_state[target] = torch.nn.Parameter(fused, requires_grad=False)
            self.replaced.update(self._stored(o)[1] for o in ops if o is not None)  # type: ignore[index]
        self.count += 1
        return nodes

    def snapshot(self) -> tuple:
        """What `rollback` restores: the pass calls it before a rewrite."""
        return list(self.specs), dict(self.spec_of), set(self.replaced), dict(self.new_state), self.count

    def rollback(self, state: tuple) -> None:
        """Forget the parameters added since `snapshot` (a failed rewrite)."""
        specs, self.spec_of, self.replaced, self.new_state, self.count = state
        self.specs[:] = specs  # the caller holds this list

    def _add_parameter(self, target: str, value: torch.Tensor, ops: list) -> fx.Node:
        graph = self.gm.graph
        params = [n for n in graph.find_nodes(op="placeholder") if self.spec_of.get(n.name, None) is not None
                  and self.spec_of[n.name].kind in _STORED]
        with graph.inserting_after(params[-1]):
            node = graph.placeholder(target.replace(".", "_"))
        ref = next(o for o in ops if o is not None).meta.get("val")
        if ref is not None:
            node.meta["val"] = ref.fake_mode.from_tensor(value, static_shapes=True)
        spec = InputSpec(kind=InputKind.PARAMETER, arg=TensorArgument(name=node.name), target=target, persistent=None)
        self.specs.insert(self.specs.index(self.spec_of[params[-1].name]) + 1, spec)
        self.spec_of[node.name] = spec
        return node


def _renamed_outputs(gm: fx.GraphModule, specs: list) -> list:
    """Output specs naming the graph's outputs now: a member's output that
    the program returns is a split piece after fusion."""
    outs = gm.graph.output_node().args[0]
    new = []
    for spec, out in zip(specs, outs):
        if isinstance(spec.arg, TensorArgument) and isinstance(out, fx.Node) and spec.arg.name != out.name:
            spec = copy.copy(spec)
            spec.arg = TensorArgument(name=out.name)
        new.append(spec)
    return new


def fuse_exported(ep: ExportedProgram, **options: Any) -> ExportedProgram:
    """A new ExportedProgram with sibling linears fused (options: `FuseConfig`'s).

    The fused program's report is ``fused.fxfuse_report``. The input program
    is left as it was.
    """
    config = FuseConfig.from_options(options)
    gm = copy.deepcopy(ep.graph_module)
    specs = list(ep.graph_signature.input_specs)
    source = _ExportedWeights(gm, ep, specs)
    report: FuseReport = _fuse(gm, config, source)
    # Members read through a fused parameter leave the program (a torchao
    # weight once none of its inner tensors is read any more).
    gone = set()
    for node in list(gm.graph.find_nodes(op="placeholder")):
        spec = source.spec_of.get(node.name)
        if spec is None or spec.target not in source.replaced:
            continue
        for access in [u for u in node.users if ACCESS is not None and u.target is ACCESS and not _readers(u)]:
            for check in list(access.users):
                gm.graph.erase_node(check)
            gm.graph.erase_node(access)
        if not _readers(node):
            for check in list(node.users):
                gm.graph.erase_node(check)
            gm.graph.erase_node(node)
            specs.remove(spec)
            gone.add(spec.target)
    gm.recompile()
    signature = copy.copy(ep.graph_signature)
    signature.input_specs = specs
    signature.output_specs = _renamed_outputs(gm, signature.output_specs)
    state = {k: v for k, v in ep.state_dict.items() if k not in gone}
    state.update(source.new_state)
    fused = ep._update(gm, signature, state_dict=state)
    fused.fxfuse_report = report  # type: ignore[attr-defined]
    report.publish()
    return fused
