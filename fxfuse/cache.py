"""What Inductor's compile caches see of fxfuse: the key its passes give
(`source_hash`), and the reports that must survive a cache hit.

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

import functools
import hashlib
import json
import weakref
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from torch import fx
from torch._guards import TracingContext
from torch._inductor.custom_graph_pass import CustomGraphPass

from . import trace
from .report import FuseReport

__all__ = ["LEDGER", "Recorder", "has_tangents", "publish", "source_hash"]

# Prefix of the counter keys in counters["inductor"] that carry a report.
CARRIER = "fxfuse_report "


@functools.lru_cache(maxsize=None)
def source_hash() -> str:
    # Once per process: the code that runs is the code that was imported.
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def has_tangents(graph: fx.Graph) -> bool:
    """Joint and backward graphs take the gradients of the outputs as inputs."""
    return any(n.op == "placeholder" and n.name.startswith("tangents") for n in graph.nodes)


def publish(report: FuseReport, pass_: Optional[Any], gm: Optional[fx.GraphModule]) -> None:
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

    def watch(self, pass_: Optional[Any]) -> None:
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
                publish(report, self.passes.get(key), None)


LEDGER = _Ledger()


class Recorder(CustomGraphPass):
    """Post-grad pass added with a pre-grad or joint pass: records the reports
    those held while Inductor compiles the forward graph of the same compile,
    so that the forward graph's cache entry carries them."""

    def __call__(self, graph: fx.Graph) -> None:
        if has_tangents(graph):
            return  # a backward graph: the forward graph's entry carries the report
        for report, key in LEDGER.release():
            LEDGER.record(report, key)

    def uuid(self) -> Optional[Any]:
        LEDGER.watch(None)
        return f"fxfuse-recorder-{source_hash()}"
