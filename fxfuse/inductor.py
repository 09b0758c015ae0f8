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

Cache hits. On a hit of the FX graph cache or of the AOTAutograd cache no
pass runs. What a hit does bring back are the counters recorded under
``counters["inductor"]`` while Inductor compiled the graph
(``fx_codegen_and_compile``, which runs the post-grad passes): the cache entry
keeps them and every hit adds them again, on torch 2.11 as on 2.13. So each
graph's report is recorded there, as the key of one counter
(``"fxfuse_report <pass> <json>"``), beside ``fxfuse_linear_calls_removed``
and ``fxfuse_groups_fused``. The post-grad pass runs inside that window and
records its own report. The pre-grad and joint passes run before it (on an
AOTAutograd hit, not at all: torch 2.13 runs a pre-grad pass that has a uuid
after that lookup), so they hold their report, and a post-grad step that
`installed` adds records it while the forward graph of the same compile is
compiled. At the end of each Dynamo compile, reports in the counters that
this process did not record came from a cache: they are published as if the
pass had run (``counters["fxfuse"]``, the pass's `report`, the INFO line,
which says "from the compile cache"). A held report that was never recorded
means its pass ran and its forward graph then came from a cache (the FX graph
cache; on torch 2.11, whose pre-grad passes run before every lookup, also the
AOTAutograd cache): it cancels the same report replayed. Compiles outside
Dynamo (``torch._inductor.compile``) that hit the FX graph cache publish
nothing; AOTInductor does not use it. Marks on fused nodes were the other way
in, and are not used: AOTAutograd's retrace of a pre-grad graph keeps only a
few meta fields meant for users, and a graph with nothing fused has no node
to mark.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import weakref
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import fx
from torch._guards import TracingContext
from torch._inductor import custom_graph_pass
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
# The hook whose pass runs while Inductor records the counters of a cache entry.
POST_GRAD = "post_grad_custom_pre_pass"
# Prefix of the counter keys in counters["inductor"] that carry a report.
CARRIER = "fxfuse_report "

# torch 2.13 hands post-grad passes of this kind `is_inference`; 2.11 has no such class.
_GraphPass: Any = getattr(custom_graph_pass, "CustomInferenceAwareGraphPass", CustomGraphPass)


@functools.lru_cache(maxsize=None)
def _source_hash() -> str:
    # Once per process: the code that runs is the code that was imported.
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


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
        joint = _has_tangents(graph)
        aten_graph = any(isinstance(n.target, torch._ops.OpOverload) for n in graph.nodes if n.op == "call_function")
        with_grad = joint or (torch.is_grad_enabled() and not aten_graph)
        # A training step's forward graph: its weights need gradients as a joint graph's do.
        trains = joint or (aten_graph and _training_forward(is_inference))
        try:
            report = _fuse(gm, self.config, _Constants(gm), runs_with_grad=with_grad, grad_graph=trains)
        except Exception as e:  # noqa: BLE001 - a pass must never break the compile
            if self.config.strict:
                raise
            log.warning("fxfuse: %r; graph left unchanged", e)
            report = FuseReport(graphs=1, errors=[repr(e)])
        _drop_unread_constants(gm)
        _publish(report, self, gm)
        if self.hook == POST_GRAD:
            _LEDGER.record(report, self._key)
        else:
            _LEDGER.hold(report, self._key)

    def uuid(self) -> Optional[Any]:
        if self.config.should_fuse is not None:
            return None  # a callback's behaviour cannot be hashed: bypass the cache
        # Inductor asks right before it looks a graph up: a hit may follow.
        _LEDGER.watch(self)
        return self._identity()

    def _identity(self) -> str:
        fields = {k: getattr(self.config, k) for k in self.config.__dataclass_fields__}
        return f"fxfuse-{self.hook}-{_source_hash()}-{sorted(fields.items())!r}"


class _Recorder(CustomGraphPass):
    """Post-grad pass added with a pre-grad or joint pass: records the reports
    those held while Inductor compiles the forward graph of the same compile,
    so that the forward graph's cache entry carries them."""

    def __call__(self, graph: fx.Graph) -> None:
        if _has_tangents(graph):
            return  # a backward graph: the forward graph's entry carries the report
        for report, key in _LEDGER.release():
            _LEDGER.record(report, key)

    def uuid(self) -> Optional[Any]:
        _LEDGER.watch(None)
        return f"fxfuse-recorder-{_source_hash()}"


def _has_tangents(graph: fx.Graph) -> bool:
    """Joint and backward graphs take the gradients of the outputs as inputs."""
    return any(n.op == "placeholder" and n.name.startswith("tangents") for n in graph.nodes)


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


def _publish(report: FuseReport, pass_: Optional[FxfusePass], gm: Optional[fx.GraphModule]) -> None:
    """Where a report shows: counters["fxfuse"], the pass's `report`, the log.
    `gm` is None for a report that came back from a cache."""
    report.publish()
    if pass_ is not None:
        pass_.report.merge(report)
    trace.show(report, gm, None, cached=gm is None)


def _encode(report: FuseReport, key: str) -> str:
    return f"{CARRIER}{key} {json.dumps(report.as_dict(), sort_keys=True, separators=(',', ':'))}"


def _decode(carrier: str) -> tuple[str, FuseReport]:
    key, payload = carrier[len(CARRIER):].split(" ", 1)
    return key, FuseReport.from_dict(json.loads(payload))


def _carriers() -> Counter:
    from torch._dynamo.utils import counters

    return Counter({k: n for k, n in counters["inductor"].items() if isinstance(k, str) and k.startswith(CARRIER)})


class _Ledger:
    """Tells the reports a cache hit added to the counters from those this
    process recorded itself (one per process)."""

    def __init__(self) -> None:
        # Carriers in the counters when the current compile first asked for a
        # uuid (no hit can come before that), and the compile it was.
        self.baseline: Optional[Counter] = None
        self.compile_id: Optional[str] = None
        self.ours: Counter = Counter()  # carriers recorded here since the baseline
        # Reports of pre-grad / joint passes waiting for their forward graph,
        # with the tracing context of their compile (which ends it).
        self.held: list[tuple[weakref.ref, FuseReport, str]] = []
        self.passes: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def watch(self, pass_: Optional[FxfusePass]) -> None:
        from torch._dynamo.callback import callback_handler
        from torch._guards import CompileContext

        if pass_ is not None:
            self.passes[pass_._key] = pass_
        # torch._dynamo.reset() clears the callbacks: register again when missing.
        if self._sweep not in callback_handler.end_callbacks:
            callback_handler.register_end_callback(self._sweep)
        compile_id = str(CompileContext.current_compile_id())
        if self.baseline is None or self.compile_id != compile_id:
            self.baseline, self.compile_id, self.ours = _carriers(), compile_id, Counter()

    def record(self, report: FuseReport, key: str) -> None:
        """Count a report where Inductor saves counters with its cache entry
        (a no-op for the cache outside its compile window)."""
        from torch._dynamo.utils import counters

        carrier = _encode(report, key)
        counters["inductor"][carrier] += 1
        counters["inductor"]["fxfuse_linear_calls_removed"] += report.removed
        counters["inductor"]["fxfuse_groups_fused"] += len(report.groups)
        if self.baseline is not None:
            self.ours[carrier] += 1

    def hold(self, report: FuseReport, key: str) -> None:
        context = TracingContext.try_get()
        if context is not None:  # without one, no compile follows to carry it
            self.held.append((weakref.ref(context), report, key))

    def release(self) -> list[tuple[FuseReport, str]]:
        """The held reports of the compile running now."""
        context = TracingContext.try_get()
        mine = [(r, k) for ref, r, k in self.held if context is not None and ref() is context]
        self.held = [(ref, r, k) for ref, r, k in self.held if ref() is not None and ref() is not context]
        return mine

    def _sweep(self, _args: Any) -> None:
        """End of a Dynamo compile: publish the reports a cache hit replayed."""
        # A held report never recorded: its pass ran and reported, and its
        # forward graph came from the cache, which replays the same report.
        reported = Counter(_encode(r, k) for _, r, k in self.held)
        self.held.clear()
        if self.baseline is None:
            return
        replayed = _carriers() - self.baseline - self.ours
        self.baseline, self.compile_id, self.ours = None, None, Counter()
        for carrier, n in replayed.items():
            key, report = _decode(carrier)
            for _ in range(n - reported[carrier]):
                _publish(report, self.passes.get(key), None)


_LEDGER = _Ledger()


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
        patches["post_grad_custom_post_pass"] = _appended(current, _Recorder())
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
