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
from typing import Any, Optional

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

from .config import FuseConfig
from .fuse import _fuse
from .forms import Group
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

    def _tensor(self, op: Any) -> Optional[torch.Tensor]:
        spec = self.spec_of.get(op.name) if isinstance(op, fx.Node) and op.op == "placeholder" else None
        if spec is None or spec.kind not in _STORED or len(_readers(op)) != 1:
            return None
        t = self.ep.state_dict.get(spec.target)  # type: ignore[arg-type]
        return t if isinstance(t, torch.Tensor) else None

    def __call__(self, gm: fx.GraphModule, group: Group) -> Optional[dict[str, fx.Node]]:
        if len(group.members) < 2:
            return None
        nodes: dict[str, fx.Node] = {}
        plans = []
        for kind in ("weight", "bias", "scale"):
            ops = [getattr(m, kind) for m in group.members]
            if all(o is None for o in ops):
                continue
            tensors = [None if o is None else self._tensor(o) for o in ops]
            if any(o is not None and t is None for o, t in zip(ops, tensors)):
                return None  # computed in the graph, or read elsewhere: concatenate in the graph
            plans.append((kind, ops, tensors))
        for kind, ops, tensors in plans:
            fused = concat_rows(tensors, group.widths)
            target = f"fxfuse.fused_{self.count}.{kind}"
            nodes[kind] = self._add_parameter(target, fused, ops)
            self.new_state[target] = torch.nn.Parameter(fused, requires_grad=False)
            self.replaced.update(self.spec_of[o.name].target for o in ops if o is not None)  # type: ignore[misc]
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
    # Members read through a fused parameter leave the program.
    for node in list(gm.graph.find_nodes(op="placeholder")):
        spec = source.spec_of.get(node.name)
        if spec is not None and spec.target in source.replaced and not _readers(node):
            for check in list(node.users):
                gm.graph.erase_node(check)
            gm.graph.erase_node(node)
            specs.remove(spec)
    gm.recompile()
    signature = copy.copy(ep.graph_signature)
    signature.input_specs = specs
    signature.output_specs = _renamed_outputs(gm, signature.output_specs)
    state = {k: v for k, v in ep.state_dict.items() if k not in source.replaced}
    state.update(source.new_state)
    fused = ep._update(gm, signature, state_dict=state)
    fused.fxfuse_report = report  # type: ignore[attr-defined]
    report.publish()
    return fused
