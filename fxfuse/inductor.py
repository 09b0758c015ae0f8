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

`uuid()` hashes fxfuse's source, the options and the hook, so Inductor's
compile caches stay on and a change to any of them misses them.

Cache hits still report what was fused: see cache.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from typing import Any, Iterator, Optional, Union

import torch
from torch import fx
from torch._guards import TracingContext
from torch._inductor import custom_graph_pass
from torch._inductor.custom_graph_pass import CustomGraphPass

from .cache import LEDGER, Recorder, has_tangents, publish, source_hash
from .config import FuseConfig
from .fuse import _fuse
from .legality import Reason, check_per_call_concat
from .forms import Group, stored_operands, value_of
from .report import FuseReport
from .weights import concat_rows

__all__ = ["FxfusePass", "inductor_pass", "installed", "HOOKS"]

log = logging.getLogger(__name__)

HOOKS = ("pre_grad_custom_pass", "joint_custom_pre_pass", "post_grad_custom_pre_pass")
# The hook whose pass runs while Inductor records the counters of a cache entry.
POST_GRAD = "post_grad_custom_pre_pass"

# torch 2.13 hands post-grad passes of this kind `is_inference`; 2.11 has no such class.
_GraphPass: Any = getattr(custom_graph_pass, "CustomInferenceAwareGraphPass", CustomGraphPass)


def _check_hook(hook: str) -> None:
    if hook not in HOOKS:
        raise ValueError(f"hook must be one of {HOOKS}, got {hook!r}")


class FxfusePass(_GraphPass):
    """Fuses sibling linears of the graph Inductor hands it; `report` sums
    every graph it ran on in this process, and those a cache hit brought back.
    `hook`: where it is installed (it decides how the report reaches the cache)."""

    def __init__(self, config: Optional[FuseConfig] = None, hook: str = POST_GRAD) -> None:
        _check_hook(hook)
        self.config = config or FuseConfig()
        self.hook = hook
        self.report = FuseReport()
        # Names this pass in the counters a cache saves: the same in every process.
        self._key = hashlib.sha256(self._identity().encode()).hexdigest()[:16]

    def __call__(self, graph: fx.Graph, is_inference: Optional[bool] = None) -> None:
        gm = graph.owning_module
        if not isinstance(gm, fx.GraphModule):
            return
        # A joint graph (forward + backward) takes the tangents as inputs; a
        # pre-grad (torch-level) graph runs under the grad mode it was traced in.
        joint = has_tangents(graph)
        aten_graph = any(isinstance(n.target, torch._ops.OpOverload) for n in graph.nodes if n.op == "call_function")
        with_grad = joint or (torch.is_grad_enabled() and not aten_graph)
        # A training step's forward graph: its weights need gradients as a joint graph's do.
        trains = joint or (aten_graph and _training_forward(is_inference))
        exposed = _expose_frozen_weights(gm) if aten_graph else []
        # Freezing folds what this graph concatenates into constants, unless
        # it has run already (post-grad) or does not run (autograd on).
        folds = torch._inductor.config.freezing and self.hook != POST_GRAD and not (with_grad or trains)
        try:
            report = _fuse(gm, self.config, _Constants(gm, folds), runs_with_grad=with_grad, grad_graph=trains)
        except Exception as e:  # noqa: BLE001 - a pass must never break the compile
            if self.config.strict:
                raise
            log.warning("fxfuse: %r; graph left unchanged", e)
            report = FuseReport(graphs=1, errors=[repr(e)])
        finally:
            _hide_unfused(gm, exposed)
        _drop_unread_constants(gm)
        publish(report, self, gm)
        if self.hook == POST_GRAD:
            LEDGER.record(report, self._key)
        else:
            LEDGER.hold(report, self._key)

    def uuid(self) -> Optional[Any]:
        if self.config.should_fuse is not None:
            return None  # a callback's behaviour cannot be hashed: bypass the cache
        # Inductor asks right before it looks a graph up: a hit may follow.
        LEDGER.watch(self)
        return self._identity()

    def _identity(self) -> str:
        fields = {k: getattr(self.config, k) for k in self.config.__dataclass_fields__}
        return f"fxfuse-{self.hook}-{source_hash()}-{sorted(fields.items())!r}"


def _training_forward(is_inference: Optional[bool]) -> bool:
    """Whether an aten graph without tangents is the forward graph of a
    training step (its backward graph is compiled separately)."""
    if is_inference is not None:  # torch 2.13, post-grad hook
        return not is_inference
    # torch 2.11 keeps it on the tracing context while the forward graph compiles;
    # 2.13 has no `is_train` there, and its joint hook sees inference graphs only
    # without tangents.
    meta = getattr(TracingContext.try_get(), "fw_metadata", None)
    return bool(getattr(meta, "is_train", False))


class _Constants:
    """Weight source for frozen graphs: members that are constants (get_attr,
    after freezing) are concatenated once, here, into one new constant, and
    the old constants the graph no longer reads are dropped. Otherwise the
    group is concatenated in the graph, which int8 groups are not unless
    `folds` (freezing will make that concatenation a constant)."""

    def __init__(self, gm: fx.GraphModule, folds: bool) -> None:
        self.gm = gm
        self.folds = folds

    def __call__(self, gm: fx.GraphModule, group: Group) -> Union[dict[str, fx.Node], Reason, None]:
        if len(group.members) < 2:
            return None  # repeats of one call: nothing to concatenate
        made = self._constants(gm, group)
        return made if made is not None or self.folds else check_per_call_concat(gm, group)

    def _constants(self, gm: fx.GraphModule, group: Group) -> Optional[dict[str, fx.Node]]:
        # Only after AOTAutograd (aten graphs) are get_attr weights frozen
        # constants; before it (pre-grad) they are the model's parameters,
        # and freezing folds the in-graph concatenation itself.
        if not isinstance(group.members[0].node.target, torch._ops.OpOverload):
            return None
        plans = []
        for kind in stored_operands(group.members[0]):
            ops = [stored_operands(m)[kind] for m in group.members]
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
            name = _free_name(gm, "_fxfuse_constant")
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


def _expose_frozen_weights(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, fx.Node]]:
    """Freezing folds a linear's ``permute(w, [1, 0])`` into a constant: the
    post-grad graph reads ``mm(x, c)`` with c of shape [K, N]. Present each
    such constant as ``permute(c.t(), [1, 0])`` (a view: no copy), so that the
    matcher sees the weight [N, K] it knows. Returns (c, c.t(), permute)."""
    # Which arguments are weight-side: torchao's dynamic int8 linear is an
    # _int_mm over the frozen int8 weight; its float8 one a _scaled_mm over the
    # frozen float8 weight and its per-column scale ([1, N], a transposed [N, 1]).
    aten = torch.ops.aten
    weight_args = {aten.mm.default: (-1,), aten.addmm.default: (-1,), aten._int_mm.default: (-1,),
                   aten._scaled_mm.default: (1, 3)}
    made = []
    for node, i in [(n, i) for n in list(gm.graph.nodes) if n.op == "call_function"
                    for i in weight_args.get(n.target, ()) if len(n.args) > abs(i)]:
        c = node.args[i]
        if not (isinstance(c, fx.Node) and c.op == "get_attr" and len(c.users) == 1):
            continue
        value, val = value_of(gm, c), c.meta.get("val")
        if not (isinstance(value, torch.Tensor) and value.dim() == 2 and hasattr(val, "fake_mode")):
            continue
        name = _free_name(gm, "_fxfuse_transposed")
        gm.register_buffer(name, value.t())
        # Beside the constant (at the top): the fused GEMM must be able to go
        # after every member's weight and before any member's first user.
        with gm.graph.inserting_after(c):
            perm = gm.graph.call_function(torch.ops.aten.permute.default, ())
        with gm.graph.inserting_before(perm):
            wt = gm.graph.get_attr(name)
        perm.args = (wt, [1, 0])
        wt.meta["val"] = val.fake_mode.from_tensor(value.t(), static_shapes=True)  # type: ignore[union-attr]
        perm.meta["val"] = val
        node.replace_input_with(c, perm)
        made.append((c, wt, perm))
    return made


def _hide_unfused(gm: fx.GraphModule, made: list[tuple[fx.Node, fx.Node, fx.Node]]) -> None:
    """Undo `_expose_frozen_weights` where the member was not fused."""
    graph = gm.graph
    alive = set(graph.nodes)
    for c, wt, perm in made:
        if perm in alive:
            perm.replace_all_uses_with(c)
            graph.erase_node(perm)
        if wt in alive and not wt.users:
            graph.erase_node(wt)
            delattr(gm, str(wt.target))
        # A fused member's own constant: read by nothing now.
        if c in alive and not c.users:
            gm.meta.setdefault("fxfuse_dropped_constants", []).append(c.target)
    if made:
        gm.recompile()


def _free_name(gm: fx.GraphModule, prefix: str) -> str:
    i = 0
    while hasattr(gm, f"{prefix}_{i}"):
        i += 1
    return f"{prefix}_{i}"


def _drop_unread_constants(gm: fx.GraphModule) -> None:
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in gm.meta.pop("fxfuse_dropped_constants", []):
        node = next((n for n in gm.graph.nodes if n.op == "get_attr" and n.target == target and not n.users), None)
        if node is not None:
            gm.graph.erase_node(node)
            read.discard(target)
        if target not in read and hasattr(gm, str(target)):
            delattr(gm, str(target))


def inductor_pass(hook: str = POST_GRAD, **options: Any) -> FxfusePass:
    """The fxfuse pass for Inductor's custom-pass hook `hook` (options: `FuseConfig`'s)."""
    return FxfusePass(FuseConfig.from_options(options), hook)


@contextlib.contextmanager
def installed(hook: str = POST_GRAD, **options: Any) -> Iterator[FxfusePass]:
    """Add an fxfuse pass to an Inductor hook inside the block, after the
    passes already there; yields the pass (its `report` fills as graphs compile).
    For the pre-grad and joint hooks it also adds the post-grad step that keeps
    their reports in the compile caches."""
    pass_ = inductor_pass(hook, **options)
    patches = {hook: _appended(getattr(torch._inductor.config, hook), pass_)}
    if hook != POST_GRAD:
        current = torch._inductor.config.post_grad_custom_post_pass
        patches["post_grad_custom_post_pass"] = _appended(current, Recorder())
    with torch._inductor.config.patch(patches):
        yield pass_


def _appended(current: Any, pass_: CustomGraphPass) -> Any:
    if current is None:
        return pass_
    passes = [*current] if isinstance(current, (list, tuple)) else [current]
    if hasattr(custom_graph_pass, "get_custom_graph_passes"):  # torch 2.13: a hook takes a list
        return type(current)(passes + [pass_]) if isinstance(current, (list, tuple)) else passes + [pass_]
    return _Chain(passes + [pass_])


class _Chain(CustomGraphPass):
    """Several passes in one hook, for torch 2.11, whose hooks call one."""

    def __init__(self, passes: list[Any]) -> None:
        self.passes = passes

    def __call__(self, graph: fx.Graph) -> None:
        for pass_ in self.passes:
            pass_(graph)

    def uuid(self) -> Optional[Any]:
        # A plain function has no uuid: then neither has the chain (no caching).
        ids = [p.uuid() if isinstance(p, CustomGraphPass) else None for p in self.passes]
        return None if any(i is None for i in ids) else tuple(ids)
