#!/usr/bin/env python
"""How long the pass itself takes on a Dynamo graph of N LLaMA-style layers.

    python benchmarks/pass_time.py --layers 32 128

The graph is captured once per size; each timed run fuses a fresh copy of it
(the copy is not timed). Like Dynamo's own graph modules, the copy generates
its Python code lazily, on first call: that code generation happens once per
compiled graph whether or not fxfuse rewrites it, so it is timed separately.
Prints medians of --reps runs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fxfuse  # noqa: E402
from fxfuse.inputs import copy_graph_module  # noqa: E402
from fxfuse.models import LlamaConfig, Transformer  # noqa: E402


def capture(n_layer: int):
    model = Transformer(LlamaConfig(n_layer=n_layer, dim=32, n_head=4, n_kv_head=2, hidden=48))
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(model, backend=record, fullgraph=True)(torch.randint(0, 128, (1, 4)))
    torch._dynamo.reset()
    return graphs[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[32, 128])
    p.add_argument("--reps", type=int, default=9)
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {args.reps} runs each, median\n")
    print("| layers | graph nodes | linear calls before -> after | pass ms | ms per layer | code generation ms |")
    print("|---|---|---|---|---|---|")
    for n in args.layers:
        gm = capture(n)
        times, codegen, report = [], [], None
        for _ in range(args.reps):
            work = copy_graph_module(gm)
            t0 = time.perf_counter()
            report = fxfuse.fuse_linears(work)
            t1 = time.perf_counter()
            work.real_recompile() if hasattr(work, "real_recompile") else work.recompile()
            times.append((t1 - t0) * 1e3)
            codegen.append((time.perf_counter() - t1) * 1e3)
        ms, cg = statistics.median(times), statistics.median(codegen)
        print(f"| {n} | {len(gm.graph.nodes)} | {report.before} -> {report.after} | {ms:.1f} | {ms / n:.2f} | {cg:.1f} |")


if __name__ == "__main__":
    main()
