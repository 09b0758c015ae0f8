"""The ``fxfuse`` torch.compile backend: fuse sibling linears, then hand the
graph to an inner compiler (Inductor by default).

    torch.compile(model, backend="fxfuse")                      # no import needed
    torch.compile(model, backend="fxfuse", options={"inner": "eager"})
    be = fxfuse.backend(inner="inductor"); torch.compile(model, backend=be)
    be.report.removed                                           # linear calls removed

The string form is found through the ``torch_dynamo_backends`` entry point
(see pyproject.toml), which calls `compile_fxfuse`. A failure inside the pass
never breaks the user's compile: it is logged and the untouched graph is
compiled, unless ``strict=True``. A bad option is an error when the backend
is built; given as ``options={...}``, fxfuse first sees it at the first
compile, and raises `OptionError` there.
"""

from __future__ import annotations

import inspect
import logging
import types
from typing import Any, Callable, Optional, Union

import torch
from torch import fx

from . import trace
from .config import FuseConfig
from .fuse import _fuse
from .guards import COMPILE
from .inputs import FusedInputs, copy_graph_module
from .legality import Reason
from .match import count_linears
from .report import FuseReport

__all__ = ["Backend", "OptionError", "backend", "compile_fxfuse"]

log = logging.getLogger(__name__)

Compiler = Callable[[fx.GraphModule, list], Callable]

# The backend's own options; the rest are FuseConfig's.
BACKEND_OPTIONS = ("inner", "mode", "inner_options")


class OptionError(ValueError):
    """A bad option given through ``torch.compile(backend="fxfuse", options=...)``."""


def _resolve_inner(inner: Union[str, Compiler], mode: Optional[str], inner_options: Optional[dict]) -> Compiler:
    if callable(inner):
        if mode or inner_options:
            raise ValueError("mode and inner_options apply to a named inner backend, not a callable")
        return inner
    if not isinstance(inner, str):
        raise TypeError(f"inner must be a backend name or a callable, got {type(inner).__name__}")
    if inner == "fxfuse":
        raise ValueError("inner='fxfuse' would fuse twice; name the compiler to run after fusion")
    if inner == "inductor":
        # The same object torch.compile builds for backend="inductor": it turns
        # `mode` into Inductor config and validates `inner_options`.
        return torch._TorchCompileInductorWrapper(mode, inner_options, None)
    from torch._dynamo.backends.registry import lookup_backend

    fn = lookup_backend(inner)
    kwargs: dict[str, Any] = {}
    if mode:
        kwargs["mode"] = mode
    if inner_options:
        kwargs["options"] = inner_options
    return lambda gm, example_inputs: fn(gm, example_inputs, **kwargs)


class Backend:
    """A configured fxfuse backend; `report` sums every graph it compiled."""

    def __init__(
        self,
        inner: Union[str, Compiler] = "inductor",
        mode: Optional[str] = None,
        inner_options: Optional[dict] = None,
        **options: Any,
    ) -> None:
        self.config = FuseConfig.from_options(options, also=BACKEND_OPTIONS)
        self.inner = inner
        self._mode, self._inner_options = mode, inner_options
        self._inner = _resolve_inner(inner, mode, inner_options)
        self._by_mode: dict[str, Compiler] = {}
        self.report = FuseReport()

    def __deepcopy__(self, memo: dict) -> "Backend":
        # A backend is a compiler, like a function (which deepcopy also returns
        # as is): its only state is the report the user holds. Libraries that
        # deep-copy their settings (transformers copies its CompileConfig on
        # every generate()) must not leave that report empty, nor hand Dynamo a
        # new backend object each time, which would recompile.
        return self

    def __call__(self, gm: fx.GraphModule, example_inputs: list, mode: Optional[str] = None,
                 **kwargs: Any) -> Callable:
        if kwargs:
            raise TypeError(
                f"unexpected arguments {sorted(kwargs)}: pass options to fxfuse.backend(...) instead"
            )
        inner = _reading(self._inner_for(mode))
        before = trace.graph_text(gm) if trace.debug_enabled() else None
        try:
            compiled, report, after = self._fuse_and_compile(gm, example_inputs, inner)
        except Exception as e:  # noqa: BLE001 - the user's compile must go on
            if self.config.strict:
                raise
            # Dynamo's own graph was never touched: compile it as it is.
            log.warning("fxfuse: %r; compiling the graph unchanged", e)
            n = count_linears(gm)
            report = FuseReport(before=n, after=n, graphs=1, errors=[repr(e)])
            compiled, after = inner(gm, example_inputs), gm
        if _ends_at_dynamic_quant_linear():
            report.skipped[Reason.AO_DYNAMIC_QUANT.value] += 1
        report.publish()
        self.report.merge(report)
        trace.show(report, after, before)
        return compiled

    def _inner_for(self, mode: Optional[str]) -> Compiler:
        """The inner compiler for the `mode` torch.compile passes along
        (``torch.compile(model, backend=be, mode=...)``; transformers'
        CompileConfig passes "reduce-overhead" by default). It reaches a named
        inner backend as ``fxfuse.backend(mode=...)`` would; a mode the backend
        was built with wins, and a callable inner has no mode to take."""
        if not mode or mode == "default" or self._mode:
            return self._inner
        if callable(self.inner):
            log.warning("fxfuse: mode=%r applies to a named inner backend; the callable %r ignores it",
                        mode, self.inner)
            return self._inner
        if mode not in self._by_mode:
            self._by_mode[mode] = _resolve_inner(self.inner, mode, self._inner_options)
        return self._by_mode[mode]

    def _fuse_and_compile(self, gm: fx.GraphModule, example_inputs: list,
                          inner: Compiler) -> tuple[Callable, FuseReport, fx.GraphModule]:
        """Fuse a copy of Dynamo's graph (Dynamo maps its own graph's
        placeholders back to the frame afterwards) and compile the copy."""
        work = copy_graph_module(gm)
        inputs = FusedInputs(work, list(example_inputs)) if self.config.weights == "auto" else None
        untouched = inputs.snapshot() if inputs is not None else ()
        try:
            return self._compile_fused(gm, work, example_inputs, inner, inputs, untouched)
        except BaseException:
            # Whatever failed (and is raised on, or compiled unchanged by the
            # caller): the weights go back to their own memory, as Dynamo saw
            # them when it traced (its fakes of a quantized weight's inner
            # tensors carry their storage offsets).
            if inputs is not None:
                inputs.rollback(untouched)
            raise

    def _compile_fused(self, gm: fx.GraphModule, work: fx.GraphModule, example_inputs: list, inner: Compiler,
                       inputs: Optional[FusedInputs], untouched: tuple) -> tuple[Callable, FuseReport, fx.GraphModule]:
        # Dynamo traced under the grad mode the graph will run under.
        report = _fuse(work, self.config, inputs, runs_with_grad=torch.is_grad_enabled())
        # (A failed rewrite was undone, fused placeholders included.)
        stored = inputs is not None and bool(inputs.slots) and not report.errors
        keep = inputs.prune() if stored else list(range(len(example_inputs)))
        args = [example_inputs[i] for i in keep] + (inputs.added() if stored else [])
        try:
            compiled = inner(work, args)
        except Exception as e:  # noqa: BLE001 - the user's compile must go on
            if self.config.strict or not report.groups:
                raise  # strict, or not the fusion's doing: the same graph would fail unfused
            # The inner compiler rejects the fused graph: compile Dynamo's own,
            # with the weights back in their own memory (see _fuse_and_compile).
            log.warning("fxfuse: the inner compiler failed on the fused graph: %r; compiling it unfused", e)
            if inputs is not None:
                inputs.rollback(untouched)
            n = count_linears(gm)
            failed = FuseReport(before=n, after=n, graphs=1, skipped=report.skipped, errors=[repr(e)])
            failed.skipped[Reason.ERROR.value] += sum(len(g.members) for g in report.groups)
            return inner(gm, example_inputs), failed, gm
        return (inputs.wrap(compiled, keep) if stored else compiled), report, work


def _reading(inner: Compiler) -> Compiler:
    """`inner`, noting the tensors each graph it compiles takes: whichever
    graph that is (fused, or Dynamo's own after a failure), `guard_filter`
    must keep the guards of what a compiled graph reads (guards.py)."""

    def compile_reading(gm: fx.GraphModule, example_inputs: list) -> Callable:
        COMPILE.reads(example_inputs)
        return inner(gm, example_inputs)

    return compile_reading


def _ends_at_dynamic_quant_linear() -> bool:
    """Did Dynamo end the graph being compiled at a torch.ao dynamic quantized
    linear? Such a call never reaches a graph, so without this a model after
    quantize_dynamic reports 0 -> 0 linear calls and no reason. Reads the
    graph-break reason Dynamo keeps for its own logs (private: any change
    there only loses the count)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        reason = InstructionTranslator.current_tx().output.compile_subgraph_reason
        frame = reason.user_stack[-1]
    except Exception:  # noqa: BLE001 - not traced by Dynamo, or its internals moved
        return False
    return bool(reason.graph_break) and "ao/nn/quantized/dynamic" in frame.filename.replace("\\", "/")


def backend(**options: Any) -> Backend:
    """A configured backend for ``torch.compile(model, backend=fxfuse.backend(...))``.

    Options: ``inner`` (a backend name or callable, default "inductor"),
    ``mode`` and ``inner_options`` (passed to a named inner backend), and the
    fields of `FuseConfig` (``min_group_size``, ``strict``, ...).
    """
    return Backend(**options)


def compile_fxfuse(
    gm: fx.GraphModule,
    example_inputs: list,
    mode: Optional[str] = None,
    options: Optional[dict] = None,
) -> Callable:
    """Entry point of ``backend="fxfuse"``; torch.compile passes mode/options,
    and this is the first moment fxfuse sees them."""
    try:
        be = Backend(**{**({"mode": mode} if mode else {}), **(options or {})})
    except (TypeError, ValueError) as e:
        raise _short(OptionError(f"backend='fxfuse': {e}"), inspect.currentframe()) from None
    return be(gm, example_inputs)


def _short(error: Exception, frame: Optional[types.FrameType]) -> Exception:
    """`error` as one Dynamo passes on unwrapped and shows from `frame` on: a
    bad option is the user's to fix, not a backend crash with Dynamo's frames."""
    from torch._dynamo import exc

    base = getattr(exc, "ShortenTraceback", None)  # torch >= 2.6
    if base is None:
        return error
    cls = type(type(error).__name__, (type(error), base), {"__module__": type(error).__module__})
    short = cls(str(error))  # (ShortenTraceback.__init__ is skipped: ValueError's takes no keywords)
    short.first_useful_frame = frame
    return short
