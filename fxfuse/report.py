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

__all__ = ["FuseReport", "FusedGroup"]


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
                (g.graph, ", ".join(m + ("+b" if b else "") for m, b in zip(g.members, g.bias)),
                 "+".join(map(str, g.widths)), g.weights, g.removed)
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
        for e in self.errors:
            lines.append(f"error: {e}")
        return "\n\n".join(lines)
