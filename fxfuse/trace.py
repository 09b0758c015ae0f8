"""What fxfuse shows of its work: log lines under the logger "fxfuse" and
structured artifacts for tlparse.

    TORCH_LOGS="fxfuse"    one INFO line per compiled graph: linear calls
                           before -> after and the groups fused (cut short
                           when long); one more when linear calls were left
                           alone because their weights need gradients
    TORCH_LOGS="+fxfuse"   DEBUG adds the graph code after the rewrite (printed
                           as TORCH_LOGS="graph_code" prints Dynamo's graphs),
                           a unified diff before -> after, and every group left
                           alone with its reason
    TORCH_TRACE=DIR        the report (JSON) and the rewritten graph as
                           artifacts "fxfuse_report" and "fxfuse_graph"

TORCH_LOGS accepts the name because fxfuse is an importable module: torch then
configures the "fxfuse" logger itself. Nothing is printed by default, and the
graph text is only built when DEBUG is on.
"""

from __future__ import annotations

import difflib
import json
import logging
from typing import Optional

from torch import fx

from .legality import Reason
from .report import FuseReport, compact_members, elide

__all__ = ["graph_text", "show"]

log = logging.getLogger("fxfuse")


def graph_text(gm: fx.GraphModule) -> str:
    """The graph's Python code, as Dynamo's graph_code log prints it."""
    try:
        return gm.print_readable(print_output=False, include_stride=True, include_device=True)
    except TypeError:  # older print_readable without these options
        return gm.print_readable(print_output=False)


def debug_enabled() -> bool:
    return log.isEnabledFor(logging.DEBUG)


def show(report: FuseReport, after: Optional[fx.GraphModule], before_text: Optional[str],
         cached: bool = False) -> None:
    """Log a compiled graph's report (and, at DEBUG, its code and diff) and
    emit the tlparse artifacts. `cached`: the report came back from a compile
    cache, so there is no graph to show (`after` is None)."""
    if log.isEnabledFor(logging.INFO):
        origin = " (from the compile cache)" if cached else ""
        log.info("%s%s%s", report.summary(), origin, _groups_line(report))
        alone = [d for d in report.gate if not d.fused]
        if alone:
            # Only what was left alone: the fused sets are in the line above.
            d = alone[0]
            log.info("fxfuse: the cost gate left %d of %d sibling sets alone, e.g. %s: %s "
                     "(the report, inspect and TORCH_LOGS=+fxfuse list every decision)",
                     len(alone), len(report.gate), compact_members(d.members), d)
        needs_grad = report.skipped.get(Reason.NEEDS_GRAD.value, 0)
        if needs_grad:
            # The most common way to fuse nothing: an .eval() model called
            # without no_grad; Dynamo traced it for autograd.
            log.info("fxfuse: %d linear calls left alone because their weights need gradients "
                     "(%s): run the model under torch.no_grad() or torch.inference_mode() to fuse "
                     "them, or pass training=True to fuse for training", needs_grad, Reason.NEEDS_GRAD.value)
    if after is not None and before_text is not None:
        after_text = graph_text(after)
        log.debug("===== fxfuse: graph after the rewrite =====\n%s", after_text)
        diff = difflib.unified_diff(before_text.splitlines(), after_text.splitlines(),
                                    "before fxfuse", "after fxfuse", lineterm="")
        log.debug("===== fxfuse: diff =====\n%s", "\n".join(diff))
    _artifacts(report, after)


def _groups_line(report: FuseReport, width: int = 160) -> str:
    """The fused groups for the INFO line, cut to about `width` characters
    (every name is in the DEBUG output and the JSON artifact)."""
    line = ""
    for i, g in enumerate(report.groups):
        item = compact_members(g.members)
        if len(item) > width // 2:  # members from many modules: name the first, count the rest
            item = f"{g.members[0]} and {len(g.members) - 1} more"
        if "{" not in item:  # no common prefix to hold the group together
            item = f"[{item}]"
        if line and len(line) + len(item) > width:
            return line + f"; ... +{len(report.groups) - i} more groups"
        line += ("; " if line else ": ") + elide(item, width)
    return line


def _artifacts(report: FuseReport, after: Optional[fx.GraphModule]) -> None:
    from torch._logging import trace_structured

    # payload functions run only when TORCH_TRACE is set.
    trace_structured("artifact", metadata_fn=lambda: {"name": "fxfuse_report", "encoding": "json"},
                     payload_fn=lambda: json.dumps(report.as_dict()))
    if after is not None:
        trace_structured("artifact", metadata_fn=lambda: {"name": "fxfuse_graph", "encoding": "string"},
                         payload_fn=lambda: graph_text(after))
