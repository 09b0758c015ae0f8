"""``python -m fxfuse``: the demo, and a look at what fxfuse does to a model.

    python -m fxfuse demo                       # compile a small LLaMA with and without fxfuse
    python -m fxfuse inspect MODULE:FACTORY     # the report for your model, nothing compiled
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from typing import Callable, Optional

import torch
from tabulate import tabulate

__all__ = ["main"]


def _time_round_robin(fns: dict[str, Callable[[], object]], device: torch.device, reps: int) -> dict[str, float]:
    """Median ms per call of each function, timed in turns (a, b, a, b, ...):
    whatever else the machine does in the meantime falls on all of them alike,
    where timing one after the other would charge it to whichever ran then."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _warm_up_inductor(device: torch.device) -> None:
    """Compile something small first: the first Inductor compile in a process
    also pays for imports and compiler start-up, which belong to neither variant."""
    x = torch.randn(4, 4, device=device)
    torch.compile(lambda t: (t @ t).relu())(x)


def demo(args: argparse.Namespace) -> int:
    from . import backend
    from .models import LlamaConfig, Transformer

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = LlamaConfig(n_layer=args.layers, dim=args.dim, n_head=8, n_kv_head=4,
                      hidden=args.dim * 8 // 3 // 8 * 8, vocab=1000, max_seq=64)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device=device, dtype=dtype).eval()
    model.setup_cache(batch=1)
    token = torch.tensor([[7]], device=device)
    pos = torch.tensor([3], device=device)
    print(f"fxfuse demo: {cfg.n_layer}-layer LLaMA-style model (dim {cfg.dim}, random weights), "
          f"one decode step at batch 1 on {device} ({dtype}), torch {torch.__version__}\n")

    fx_backend = backend(inner="inductor")
    variants = {"inductor": torch.compile(model), "fxfuse + inductor": torch.compile(model, backend=fx_backend)}
    compile_s = {}
    with torch.no_grad():
        ref = model(token, pos)
        tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else {}
        _warm_up_inductor(device)
        # No cache may serve one variant what the other compiled.
        with torch._inductor.config.patch(force_disable_caches=True):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                out = fn(token, pos)
                compile_s[name] = time.perf_counter() - t0
                torch.testing.assert_close(out, ref, **tol)  # raises if the outputs differ
        steps = {name: (lambda fn=fn: fn(token, pos)) for name, fn in variants.items()}
        _time_round_robin(steps, device, reps=5)  # warm both up before timing
        ms = _time_round_robin(steps, device, args.reps)
    print(fx_backend.report, "\n")
    base = ms["inductor"]
    print(tabulate([[n, f"{compile_s[n]:.1f}", f"{ms[n]:.3f}", f"{base / ms[n]:.2f}x"] for n in variants],
                   headers=["variant", "compile s", "ms / step (median)", "speed vs inductor"]))
    print("\ncompile s: the first call, after a warm-up compile, with Inductor's caches off")
    print(f"ms / step: the median of {args.reps} steps per variant, the variants taking turns")
    print("outputs match eager for both variants")
    return 0


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _load_factory(target: str) -> Callable[[], object]:
    import importlib
    import importlib.util

    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"target must look like MODULE:FACTORY or path/to/file.py:FACTORY, got {target!r}")
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            spec = importlib.util.spec_from_file_location("fxfuse_inspect_target", module_name)
            if spec is None or spec.loader is None or not os.path.exists(module_name):
                raise CliError(f"no such file: {module_name}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except CliError:
        raise
    except Exception as e:  # noqa: BLE001 - any import failure is the user's to fix
        raise CliError(f"cannot import {module_name!r}: {type(e).__name__}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CliError(f"{module_name!r} has no callable {attr!r}")
    return factory


def _example_inputs(args: argparse.Namespace) -> tuple:
    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise CliError(f"unknown dtype {args.dtype!r}")
    inputs = []
    for spec in args.input_shape:
        try:
            shape = tuple(int(d) for d in spec.split(","))
        except ValueError:
            raise CliError(f"--input-shape takes comma-separated ints, got {spec!r}") from None
        # Integer inputs are token ids: zeros are valid for any vocabulary.
        inputs.append(torch.randn(shape, dtype=dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype))
    return tuple(inputs)


def _call_args(inputs: object) -> tuple[tuple, dict]:
    """Positional and keyword inputs from what a factory returned: a tuple or
    list (positional), a dict (keywords, as Hugging Face models take them),
    or a single tensor."""
    if isinstance(inputs, dict):
        return (), inputs
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    raise CliError(f"example inputs must be a tuple, a list, a dict or a tensor, got {type(inputs).__name__}")


def _why_tracing_failed(e: Exception, model: Callable, args: tuple, kwargs: dict) -> str:
    """One line that keeps the cause: Dynamo's first line alone ("RuntimeError
    when making fake tensor call") says nothing of what went wrong."""
    try:
        model(*args, **kwargs)
    except Exception as eager:  # noqa: BLE001 - the user's model: report its error
        frames = traceback.extract_tb(eager.__traceback__)
        torch_dir = os.path.dirname(torch.__file__)
        frame = ([f for f in frames if not f.filename.startswith(torch_dir)] or frames)[-1]  # the user's line
        where = f" ({os.path.basename(frame.filename)}:{frame.lineno})"
        return f"the model fails without compiling too: {type(eager).__name__}: {_first_line(eager)}{where}"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    cause = next((line for line in lines if line.startswith("Explanation:")), "")
    return f"tracing the model failed: {type(e).__name__}: {' '.join(lines[:1] + [cause])}"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def inspect(args: argparse.Namespace) -> int:
    import difflib

    from .backend import Backend
    from .trace import graph_text

    factory = _load_factory(args.target)
    try:
        built = factory()
    except Exception as e:  # noqa: BLE001 - the user's factory failed: say so in one line
        raise CliError(f"{args.target}() raised {type(e).__name__}: {e}") from None
    model, *given = built if isinstance(built, tuple) else (built,)
    if not callable(model):
        raise CliError(f"{args.target} returned {type(model).__name__}, not a model")
    if len(given) > 2:
        raise CliError(f"{args.target} returned {len(given) + 1} values: expected model, (model, inputs) "
                       "or (model, args, kwargs)")
    if not given:
        if not args.input_shape:
            raise CliError("the factory returned only a model: give --input-shape (and --dtype for token ids)")
        given = [_example_inputs(args)]
    call_args, call_kwargs = _call_args(given[0]) if len(given) == 1 else (tuple(given[0]), dict(given[1]))
    if isinstance(model, torch.nn.Module):
        model.eval()
    befores: list[str] = []
    afters: list = []

    def after_fusion(gm, example_inputs):
        afters.append(gm)
        return gm.forward  # nothing compiled: the fused graph runs as Python

    # The backend itself, under no_grad as an inference call runs: the report
    # shows what compiling would fuse, with the weights mode it would use.
    be = Backend(inner=after_fusion)

    def record(gm, example_inputs):
        befores.append(graph_text(gm) if args.diff else "")
        return be(gm, example_inputs)

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, backend=record)(*call_args, **call_kwargs)
    except Exception as e:  # noqa: BLE001
        with torch.no_grad():
            raise CliError(_why_tracing_failed(e, model, call_args, call_kwargs)) from None
    print(be.report)
    if args.diff:
        for i, (before, after) in enumerate(zip(befores, afters)):
            print("\n" + "\n".join(difflib.unified_diff(
                before.splitlines(), graph_text(after).splitlines(),
                f"graph {i} before fxfuse", f"graph {i} after fxfuse", lineterm="")))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fxfuse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="compile a small LLaMA-style model with and without fxfuse",
                       description="Build a small LLaMA-style model (random weights), compile it with "
                       "Inductor and with fxfuse + Inductor, check both against eager, and print "
                       "the fusion report and the timings.")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--dim", type=int, default=512, help="model width (default 512)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--reps", type=int, default=50, help="timed steps per variant, taken in turns (default 50)")
    p.set_defaults(func=demo)
    p = sub.add_parser("inspect", help="show what fxfuse would fuse in your model",
                       description="Import a model factory, trace the model with example inputs under "
                       "torch.no_grad(), run the fxfuse backend on the captured graphs as compiling "
                       "would (no compiler after it: the fused graphs run as Python) and print the "
                       "report: every fused group with its members, widths and weights mode, linear "
                       "calls before -> after, and every group left alone with its reason.")
    p.add_argument("target", help="MODULE:FACTORY or path/to/file.py:FACTORY; the factory takes no "
                   "arguments and returns a model, (model, inputs) where inputs is a tuple, a dict of "
                   "keyword inputs or a tensor, or (model, args, kwargs)")
    p.add_argument("--input-shape", action="append", default=[], metavar="D0,D1,...",
                   help="shape of one example input (repeat for several); needed when the factory "
                   "returns only a model")
    p.add_argument("--dtype", default="float32", help="dtype of the example inputs, e.g. float32 or "
                   "int64 for token ids (default float32)")
    p.add_argument("--diff", action="store_true", help="also print each graph's diff, before -> after")
    p.set_defaults(func=inspect)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as e:
        print(f"python -m fxfuse {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
