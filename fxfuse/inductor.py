"""fxfuse inside Inductor: a custom graph pass for users who compile with
``backend="inductor"`` (or AOTInductor) and do not want to switch backends.

    import fxfuse, torch
    with fxfuse.installed("post_grad_custom_pre_pass"):
        compiled = torch.compile(model)

`inductor_pass(**options)` returns the pass; `installed(hook, **options)`
adds it to one of Inductor's hooks for the duration of a block, after any pass
already there (another library's pass is kept, not overwritten). Hooks:

  pre_grad_custom_pass        torch-level graph, before AOTAutograd
  joint_custom_pre_pass       aten graph: forward only in inference, forward
                              and backward in training (the backward keeps its
                              own per-member GEMMs; only the forward is fused)
  post_grad_custom_pre_pass   aten graph after functionalization

The weights are graph inputs there, so the fused weight is a concatenation in
the graph; with ``torch._inductor.config.freezing=True`` Inductor folds that
concatenation into one constant (pre-grad and joint hooks: freezing runs
after them), and after freezing (post-grad hook) the weights are constants
already, which the pass concatenates once into a new constant.

`uuid()` hashes fxfuse's source and the options, so Inductor's FX graph cache
stays on and a change to either misses it. Inductor replays the counters a
compile recorded under ``counters["inductor"]`` on a cache hit, so the pass
mirrors its report there too (``fxfuse_linear_calls_removed``, ...).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from . import trace
from .config import FuseConfig
from .fuse import _fuse
from .match import Group, value_of
from .report import FuseReport
from .weights import concat_rows

__all__ = ["FxfusePass", "inductor_pass", "installed", "HOOKS"]

log = logging.getLogger(__name__)

HOOKS = ("pre_grad_custom_pass", "joint_custom_pre_pass", "post_grad_custom_pre_pass")


def _source_hash() -> str:
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


class FxfusePass(CustomGraphPass):
    """Fuses sibling linears of the graph Inductor hands it; `report` sums
    every graph it ran on in this process."""

    def __init__(self, config: Optional[FuseConfig] = None) -> None:
        self.config = config or FuseConfig()
        self.report = FuseReport()

    def __call__(self, graph: fx.Graph) -> None:
        gm = graph.owning_module
        if not isinstance(gm, fx.GraphModule):
            return
        # A joint graph (forward + backward) takes the tangents as inputs; a
        # pre-grad (torch-level) graph runs under the grad mode it was traced in.
        joint = any(n.op == "placeholder" and n.name.startswith("tangents") for n in graph.nodes)
        aten_graph = any(isinstance(n.target, torch._ops.OpOverload) for n in graph.nodes if n.op == "call_function")
        with_grad = joint or (torch.is_grad_enabled() and not aten_graph)
        try:
            report = _fuse(gm, self.config, _Constants(gm), runs_with_grad=with_grad, grad_graph=joint)
        except Exception as e:  # noqa: BLE001 - a pass must never break the compile
            if self.config.strict:
                raise
            log.warning("fxfuse: %r; graph left unchanged", e)
            report = FuseReport(graphs=1, errors=[repr(e)])
        _drop_unread_constants(gm)
        report.publish()
        _mirror_into_inductor_counters(report)
        self.report.merge(report)
        trace.show(report, gm, None)

    def uuid(self) -> Optional[Any]:
        if self.config.should_fuse is not None:
            return None  # a callback's behaviour cannot be hashed: bypass the cache
        fields = {k: getattr(self.config, k) for k in self.config.__dataclass_fields__}
        return f"fxfuse-{_source_hash()}-{sorted(fields.items())!r}"


class _Constants:
    """Weight source for frozen graphs: members that are constants (get_attr,
    after freezing) are concatenated once, here, into one new constant, and
    the old constants the graph no longer reads are dropped."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm

    def __call__(self, gm: fx.GraphModule, group: Group) -> Optional[dict[str, fx.Node]]:
        # Only after AOTAutograd (aten graphs) are get_attr weights frozen
        # constants; before it (pre-grad) they are the model's parameters,
        # and freezing folds the in-graph concatenation itself.
        if len(group.members) < 2 or not isinstance(group.members[0].node.target, torch._ops.OpOverload):
            return None
        plans = []
        for kind in ("weight", "bias", "scale"):
            ops = [getattr(m, kind) for m in group.members]
            if all(o is None for o in ops):
                continue
            if not all(o is None or (isinstance(o, fx.Node) and o.op == "get_attr" and len(o.users) == 1)
                       for o in ops):
                return None
            plans.append((kind, ops))
        nodes = {}
        for kind, ops in plans:
            values = [None if o is None else value_of(gm, o) for o in ops]
            if not all(v is None or isinstance(v, torch.Tensor) for v in values):
                return None
            fused = concat_rows(values, group.widths)  # type: ignore[arg-type]
            i = 0
            while hasattr(gm, f"_fxfuse_constant_{i}"):
                i += 1
            name = f"_fxfuse_constant_{i}"
            gm.register_buffer(name, fused)  # what a get_attr of a tensor expects
            anchor = next(o for o in ops if o is not None)
            with gm.graph.inserting_before(anchor):
                nodes[kind] = gm.graph.get_attr(name)
            val = anchor.meta.get("val")
            if val is not None:
                nodes[kind].meta["val"] = val.fake_mode.from_tensor(fused, static_shapes=True) \
                    if hasattr(val, "fake_mode") else fused
            for o in ops:
                if o is not None:
                    self._drop_after_use(o)
        return nodes

    def _drop_after_use(self, node: fx.Node) -> None:
        # The member still reads it until the rewrite reroutes its users; the
        # constant goes once the rewrite has erased the member.
        self.gm.meta.setdefault("fxfuse_dropped_constants", []).append(node.target)


def _drop_unread_constants(gm: fx.GraphModule) -> None:
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in gm.meta.pop("fxfuse_dropped_constants", []):
        node = next((n for n in gm.graph.nodes if n.op == "get_attr" and n.target == target and not n.users), None)
        if node is not None:
            gm.graph.erase_node(node)
            read.discard(target)
        if target not in read and hasattr(gm, str(target)):
            delattr(gm, str(target))


def _mirror_into_inductor_counters(report: FuseReport) -> None:
    from torch._dynamo.utils import counters

    counters["inductor"]["fxfuse_linear_calls_removed"] += report.removed
    counters["inductor"]["fxfuse_groups_fused"] += len(report.groups)


def inductor_pass(**options: Any) -> FxfusePass:
    """The fxfuse pass for Inductor's custom-pass hooks (options: `FuseConfig`'s)."""
    return FxfusePass(FuseConfig.from_options(options))


@contextlib.contextmanager
def installed(hook: str = "post_grad_custom_pre_pass", **options: Any) -> Iterator[FxfusePass]:
    """Add an fxfuse pass to an Inductor hook inside the block, after the
    passes already there; yields the pass (its `report` fills as graphs compile)."""
    if hook not in HOOKS:
        raise ValueError(f"hook must be one of {HOOKS}, got {hook!r}")
    pass_ = inductor_pass(**options)
    current = getattr(torch._inductor.config, hook)
    if current is None:
        new: Any = pass_
    elif isinstance(current, (list, tuple)):
        new = type(current)([*current, pass_])
    else:
        new = [current, pass_]
    with torch._inductor.config.patch({hook: new}):
        yield pass_
