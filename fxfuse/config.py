"""`FuseConfig`: the options of `fuse_linears`, validated on creation."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from .forms import Group

__all__ = ["FuseConfig", "WEIGHT_MODES", "check_option_names"]

# How the backend gives the fused GEMM its weight:
#   "auto": where the members are parameters or buffers that need no gradient,
#           move them once into one storage that the compiled graph reads
#           directly (weights.py); elsewhere, "cat";
#   "cat":  a torch.cat of the member weights inside the graph (differentiable,
#           works everywhere, but re-copies the weights on every call).
# `fuse_linears` on a bare graph has no real tensors and always uses "cat".
WEIGHT_MODES = ("auto", "cat")


@dataclass(frozen=True)
class FuseConfig:
    """Options of `fuse_linears` and of the `fxfuse` backend.

    min_group_size: the fewest siblings worth one fused GEMM (2: any pair pays,
        since it saves one launch and one read of the shared input).
    max_group_size: split larger sibling sets into chunks of at most this many
        (None: no cap; one GEMM for the whole set is the point).
    max_rows: leave siblings alone when their shared input has more rows than
        this (rows: the product of all dimensions but the last); None: no
        limit. A user override: the cost gate (`min_speedup`) decides by
        default. On an H100, 4 LLaMA-7B-sized layers ran 1.2-1.4x faster
        fused at 1-256 rows and 0.98-1.01x at 1024-4096 (docs/benchmarks.md).
    min_speedup: fuse a set of siblings only where the cost model (cost.py)
        predicts the fused GEMM at least this much faster than the separate
        ones, from their rows, K, widths, dtype and device; None turns the
        gate off. 1.05 is chosen: below it, the measured gain on the GEMMs
        (1-3%) is what the split's strided pieces cost downstream
        (docs/design.md, "The cost gate").
    should_fuse: called with each `Group` that passed every built-in check;
        return False to leave it alone (reason "vetoed").
    strict: re-raise errors inside the pass instead of compiling the graph
        unchanged.
    weights: see WEIGHT_MODES.
    training: in the backend, also fuse groups whose weights need gradients
        (through an in-graph cat, which autograd can split). Off by default:
        on an H100 that made a 4-layer LLaMA-7B-sized forward + backward
        slower (0.953x, docs/benchmarks.md). `fuse_linears` on a bare graph
        cannot know how the graph will run and always fuses.
    """

    min_group_size: int = 2
    max_group_size: Optional[int] = None
    max_rows: Optional[int] = None
    min_speedup: Optional[float] = 1.05
    should_fuse: Optional[Callable[["Group"], bool]] = None
    strict: bool = False
    weights: str = "auto"
    training: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.min_group_size, int) or self.min_group_size < 2:
            raise ValueError(f"min_group_size must be an int >= 2, got {self.min_group_size!r}")
        if self.max_group_size is not None and (
            not isinstance(self.max_group_size, int) or self.max_group_size < self.min_group_size
        ):
            raise ValueError(
                f"max_group_size must be None or an int >= min_group_size "
                f"({self.min_group_size}), got {self.max_group_size!r}"
            )
        if self.max_rows is not None and (not isinstance(self.max_rows, int) or self.max_rows < 1):
            raise ValueError(f"max_rows must be None or a positive int, got {self.max_rows!r}")
        if self.min_speedup is not None and (
            isinstance(self.min_speedup, bool) or not isinstance(self.min_speedup, (int, float))
            or not self.min_speedup > 0
        ):
            raise ValueError(f"min_speedup must be None or a number > 0, got {self.min_speedup!r}")
        if self.should_fuse is not None and not callable(self.should_fuse):
            raise TypeError(f"should_fuse must be callable, got {type(self.should_fuse).__name__}")
        if self.weights not in WEIGHT_MODES:
            raise ValueError(f"weights must be one of {WEIGHT_MODES}, got {self.weights!r}")
        for name in ("strict", "training"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @classmethod
    def from_options(cls, options: dict[str, Any], also: tuple[str, ...] = ()) -> "FuseConfig":
        """Build from a dict, naming any unknown key (a typo must not pass
        silently). `also`: the caller's own option names, valid but not ours."""
        known = [f.name for f in fields(cls)]
        check_option_names(options, [*also, *known])
        return cls(**options)


def check_option_names(options: dict[str, Any], known: list[str]) -> None:
    """One line naming the first unknown option and every valid one, in the
    manner of torch.compile's "Unexpected optimization option" for Inductor."""
    unknown = [k for k in options if k not in known]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown fxfuse option {unknown[0]!r}{hint}; known options are: {', '.join(known)}")
