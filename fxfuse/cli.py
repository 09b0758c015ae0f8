"""``python -m fxfuse``: the demo, and a look at what fxfuse does to a model."""

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fxfuse", description=__doc__)
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
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
