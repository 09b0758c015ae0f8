"""`FuseReport`: what the pass did, counted exactly.

Units, so nobody has to guess:
  before / after   linear calls in the graph before and after the pass
  removed          linear calls removed (a group of k members removes k - 1)
  groups           fused groups, each one GEMM now
  skipped[reason]  linear calls left unfused for that reason

The same numbers go to ``torch._dynamo.utils.counters``: "fxfuse" holds
"linear_calls_before", "linear_calls_after", "linear_calls_removed" and
"groups_fused"; "fxfuse_skipped" holds the skipped calls by reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tabulate import tabulate

__all__ = ["FuseReport", "FusedGroup", "compact_members", "elide"]

# Columns that keep a report row within 160 characters, the width of a wide
# terminal: module paths of diffusers or PEFT models run to 80 characters each,
# and a group of 64 cross-attention k/v would otherwise make a row thousands
# of characters wide. The full names stay in `as_dict()` (the JSON artifact).
MEMBERS_WIDTH = 88
WIDTHS_WIDTH = 24


def compact_members(members: tuple[str, ...], bias: tuple[bool, ...] = (), width: int = 0) -> str:
    """Members as a list if it fits in `width`, else with their common dotted
    prefix written once, in brace form: ``attn1.{to_q+b, to_k, to_v}``
    (+b: the member has a bias)."""
    names = [m + ("+b" if b else "") for m, b in zip(members, bias or (False,) * len(members))]
    if len(", ".join(names)) <= width:
        return ", ".join(names)
    parts = [m.split(".") for m in members]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    if common == 0:
        return ", ".join(names)
    prefix = ".".join(parts[0][:common])
    return prefix + ".{" + ", ".join(n[len(prefix) + 1:] for n in names) + "}"


def compact_widths(widths: tuple[int, ...], width: int = 0) -> str:
    """Split sizes, if they fit in `width`, else with runs written once: ``320+2x80``."""
    if len("+".join(map(str, widths))) <= width:
        return "+".join(map(str, widths))
    runs: list[list[int]] = []
    for w in widths:
        if runs and runs[-1][0] == w:
            runs[-1][1] += 1
        else:
            runs.append([w, 1])
    return "+".join(f"{n}x{w}" if n > 1 else str(w) for w, n in runs)


def elide(text: str, width: int) -> str:
    """`text` cut to `width` characters, saying how much was left out."""
    if len(text) <= width:
        return text
    tail = f" ...(+{len(text)} chars)"
    return text[: max(width - len(tail), 0)] + tail


@dataclass(frozen=True)
class FusedGroup:
    members: tuple[str, ...]  # module paths in the user's model
    widths: tuple[int, ...]  # out_features per member, in split order
    bias: tuple[bool, ...]  # whether each member had a bias
    weights: str  # "cat" or "storage": how the fused weight is built
    graph: int = 0  # index of the compiled graph (backend reports)

    @property
    def removed(self) -> int:
        return len(self.members) - 1


@dataclass
class FuseReport:
    before: int = 0
    after: int = 0
    groups: list[FusedGroup] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    graphs: int = 0  # graphs this report covers
    errors: list[str] = field(default_factory=list)
    gate: list = field(default_factory=list)  # cost.GateDecision per sibling set, fused or not

    @property
    def removed(self) -> int:
        return sum(g.removed for g in self.groups)

    def merge(self, other: "FuseReport") -> None:
        """Add another graph's report to this one (the backend's running total)."""
        base = self.graphs
        self.before += other.before
        self.after += other.after
        self.groups += [
            FusedGroup(g.members, g.widths, g.bias, g.weights, base + g.graph) for g in other.groups
        ]
        self.skipped.update(other.skipped)
        self.errors += other.errors
        self.gate += [replace(d, graph=base + d.graph) for d in other.gate]
        self.graphs += other.graphs

    def publish(self) -> None:
        """Mirror this report into torch._dynamo.utils.counters."""
        from torch._dynamo.utils import counters

        counters["fxfuse"]["linear_calls_before"] += self.before
        counters["fxfuse"]["linear_calls_after"] += self.after
        counters["fxfuse"]["linear_calls_removed"] += self.removed
        counters["fxfuse"]["groups_fused"] += len(self.groups)
        for reason, n in self.skipped.items():
            counters["fxfuse_skipped"][reason] += n

    def as_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): what the tlparse artifact and a cache entry hold."""
        return {
            "before": self.before, "after": self.after, "removed": self.removed,
            "groups": [asdict(g) for g in self.groups],
            "skipped": dict(self.skipped), "graphs": self.graphs, "errors": list(self.errors),
            "gate": [asdict(d) for d in self.gate],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FuseReport":
        """The inverse of `as_dict` ("removed" is derived, so it is not read)."""
        groups = [FusedGroup(tuple(g["members"]), tuple(g["widths"]), tuple(g["bias"]), g["weights"], g["graph"])
                  for g in data["groups"]]
        from .cost import GateDecision

        gate = [GateDecision(**{**d, "members": tuple(d["members"]), "widths": tuple(d["widths"])})
                for d in data.get("gate", [])]
        return cls(data["before"], data["after"], groups, Counter(data["skipped"]), data["graphs"],
                   list(data["errors"]), gate)

    def summary(self) -> str:
        return (
            f"fxfuse: {self.before} -> {self.after} linear calls "
            f"({self.removed} removed in {len(self.groups)} groups, {self.graphs} graph(s))"
        )

    def __str__(self) -> str:
        lines = [self.summary()]
        if self.groups:
            rows = [
                (g.graph, _wrap(compact_members(g.members, g.bias, MEMBERS_WIDTH), MEMBERS_WIDTH),
                 elide(compact_widths(g.widths, WIDTHS_WIDTH), WIDTHS_WIDTH), g.weights, g.removed)
                for g in self.groups
            ]
            lines.append(tabulate(rows, headers=["graph", "members (+b: bias)", "widths", "weights", "removed"]))
        if self.skipped:
            rows = sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0]))
            lines.append(tabulate(rows, headers=["left alone because", "linear calls"]))
        if self.gate:  # the cost gate (cost.py), per set of siblings
            rows = [(d.graph, d.input, "symbolic" if d.rows is None else d.rows, d.k, len(d.widths),
                     d.why,
                     "fused" if d.fused else "left alone") for d in self.gate]
            lines.append(tabulate(rows, headers=["graph", "cost gate: input", "rows", "K", "members",
                                                 "because", "decision"]))
        for e in self.errors:  # in full in as_dict()
            lines.append(elide(f"error: {e}".splitlines()[0], 160))
        return "\n\n".join(lines)


def _wrap(text: str, width: int, max_lines: int = 3) -> str:
    """A table cell of at most `max_lines` lines of about `width`, broken
    between members; what does not fit is counted ("+5 more")."""
    items = text.split(", ")
    lines = [items[0]]
    for i, item in enumerate(items[1:], 1):
        if len(lines[-1]) + len(item) + 2 <= width:
            lines[-1] += ", " + item
            continue
        if len(lines) == max_lines:
            lines[-1] += f", ... +{len(items) - i} more" + ("}" if text.endswith("}") else "")
            break
        lines[-1] += ","
        lines.append(item)
    return "\n".join(elide(line, width + 16) for line in lines)
