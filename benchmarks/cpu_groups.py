#!/usr/bin/env python
"""CPU, batch 1: 8 groups of 3 Linear(2048, 2048) reading one input each.

Variants compiled in one process and timed round-robin (medians):
  inductor      torch.compile(model)
  fxfuse        torch.compile(model, backend="fxfuse")      fused weights in one storage
  fxfuse_cat    fxfuse with weights="cat"                   torch.cat in the graph

Also the memory the weights take after each compile (distinct parameter
storages) and the process's resident memory.

    python benchmarks/cpu_groups.py
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fxfuse  # noqa: E402


class Groups(nn.Module):
    def __init__(self, n_groups=8, d=2048):
        super().__init__()
        self.groups = nn.ModuleList(nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(3))
                                    for _ in range(n_groups))

    def forward(self, x):
        for q, k, v in self.groups:
            x = torch.tanh(q(x) + k(x) * v(x))
        return x


def weight_bytes(model) -> int:
    return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}.values())


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=50, help="timed calls per repeat")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = Groups().eval()
    x = torch.randn(1, 2048)
    w0, rss0 = weight_bytes(model), rss_mb()
    fns, mem = {}, {}
    with torch.no_grad():
        ref = model(x)
        for name, backend in (("inductor", "inductor"), ("fxfuse", fxfuse.backend()),
                              ("fxfuse_cat", fxfuse.backend(weights="cat"))):
            fn = torch.compile(model, backend=backend)
            torch.testing.assert_close(fn(x), ref, atol=1e-4, rtol=1e-4)
            fns[name] = fn
            mem[name] = (weight_bytes(model) - w0, rss_mb() - rss0)
        times = {n: [] for n in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                for _ in range(3):
                    fn(x)
                t = []
                for _ in range(args.calls):
                    t0 = time.perf_counter()
                    fn(x)
                    t.append(time.perf_counter() - t0)
                times[name].append(statistics.median(t) * 1e3)
    base = statistics.median(times["inductor"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, weights {w0 / 2**20:.0f} MiB, "
          f"{args.repeats} repeats x {args.calls} calls\n")
    print("| variant | ms / call (median of repeat medians) | time vs inductor | repeats | "
          "weight storage change MiB | RSS change since start MiB |")
    print("|---|---|---|---|---|---|")
    for name, t in times.items():
        med = statistics.median(t)
        print(f"| {name} | {med:.3f} | {med / base:.3f} | {', '.join(f'{v:.3f}' for v in t)} | "
              f"{mem[name][0] / 2**20:.1f} | {mem[name][1]:.0f} |")


if __name__ == "__main__":
    main()
