"""``python -m fxfuse``: the demo, and a look at what fxfuse does to a model.

    python -m fxfuse demo                       # compile a small LLaMA with and without fxfuse
    python -m fxfuse inspect MODULE:FACTORY     # the report for your model, nothing compiled
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Optional

import torch
from tabulate import tabulate

__all__ = ["main"]


def _median_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


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
    rows = []
    with torch.no_grad():
        ref = model(token, pos)
        tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else {}
        for name, fn in variants.items():
            t0 = time.perf_counter()
            out = fn(token, pos)
            compile_s = time.perf_counter() - t0
            torch.testing.assert_close(out, ref, **tol)  # raises if the outputs differ
            for _ in range(3):
                fn(token, pos)  # warm up
            rows.append([name, compile_s, _median_ms(lambda: fn(token, pos), device, args.reps)])
    print(fx_backend.report, "\n")
    base = rows[0][2]
    print(tabulate([[n, f"{c:.1f}", f"{ms:.3f}", f"{base / ms:.2f}x"] for n, c, ms in rows],
                   headers=["variant", "compile s", "ms / step (median)", "speed vs inductor"]))
    print("\noutputs match eager for both variants")
    return 0


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _load_factory(target: str) -> Callable[[], object]:
    import importlib
    import importlib.util
    import os

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


def inspect(args: argparse.Namespace) -> int:
    import difflib

    from . import FuseReport, fuse_linears
    from .inputs import copy_graph_module
    from .trace import graph_text

    factory = _load_factory(args.target)
    try:
        built = factory()
    except Exception as e:  # noqa: BLE001 - the user's factory failed: say so in one line
        raise CliError(f"{args.target}() raised {type(e).__name__}: {e}") from None
    model, inputs = built if isinstance(built, tuple) else (built, None)
    if not callable(model):
        raise CliError(f"{args.target} returned {type(model).__name__}, not a model")
    if inputs is None:
        if not args.input_shape:
            raise CliError("the factory returned only a model: give --input-shape (and --dtype for token ids)")
        inputs = _example_inputs(args)
    if isinstance(model, torch.nn.Module):
        model.eval()
    graphs: list = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, backend=record)(*inputs)
    except Exception as e:  # noqa: BLE001
        raise CliError(f"tracing the model failed: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    total = FuseReport()
    diffs = []
    for i, gm in enumerate(graphs):
        work = copy_graph_module(gm)
        total.merge(fuse_linears(work))
        if args.diff:
            diffs.append("\n".join(difflib.unified_diff(
                graph_text(gm).splitlines(), graph_text(work).splitlines(),
                f"graph {i} before fxfuse", f"graph {i} after fxfuse", lineterm="")))
    print(total)
    for d in diffs:
        print("\n" + d)
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
    p.add_argument("--reps", type=int, default=50, help="timed steps per variant (default 50)")
    p.set_defaults(func=demo)
    p = sub.add_parser("inspect", help="show what fxfuse would fuse in your model",
                       description="Import a model factory, trace the model with example inputs "
                       "(Dynamo only: nothing is compiled), run the fusion pass on the captured "
                       "graphs and print the report: every fused group with its members and widths, "
                       "linear calls before -> after, and every group left alone with its reason.")
    p.add_argument("target", help="MODULE:FACTORY or path/to/file.py:FACTORY; the factory takes no "
                   "arguments and returns a model, or (model, example_inputs)")
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
