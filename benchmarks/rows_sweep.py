#!/usr/bin/env python
"""Where does fusing stop paying? Forward time of LLaMA-7B-sized layers at
several token counts (rows of the GEMMs), unfused vs fxfuse, in one process.

    python benchmarks/rows_sweep.py --layers 4 --rows 1 16 64 256 1024 2048 4096

Per row count both variants are compiled (default mode, static shapes) and
timed round-robin; medians of --repeats, each the mean of --iters calls.
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
from fxfuse.models import LlamaConfig, Transformer  # noqa: E402
from llama_train import Layers  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 256, 1024, 2048, 4096])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    max_rows = max(args.rows)
    cfg = (LlamaConfig(n_layer=2, max_seq=max_rows) if args.tiny
           else LlamaConfig.llama2_7b(n_layer=args.layers, max_seq=max_rows))
    torch.manual_seed(0)
    with torch.device(dev):
        model = Layers(Transformer(cfg).to(dtype)).eval()
    torch._dynamo.config.cache_size_limit = 64
    fns = {"unfused": torch.compile(model, dynamic=False),
           "fxfuse": torch.compile(model, backend=fxfuse.backend(), dynamic=False)}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    print(f"card: {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, "
          f"{cfg.n_layer} layers dim {cfg.dim}, {dtype}, forward under no_grad")
    print(f"command: {' '.join(sys.argv)}\n")
    print("| rows (tokens) | unfused ms | fxfuse ms | fxfuse speedup | spread unfused / fxfuse |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for rows in args.rows:
            x = torch.randn(1, rows, cfg.dim, device=dev, dtype=dtype)
            for fn in fns.values():
                for _ in range(3):
                    fn(x)
            times = {n: [] for n in fns}
            for _ in range(args.repeats):
                for name, fn in fns.items():
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(args.iters):
                        fn(x)
                    sync()
                    times[name].append((time.perf_counter() - t0) * 1e3 / args.iters)
            u, f = (statistics.median(times[n]) for n in ("unfused", "fxfuse"))
            spread = [(max(t) - min(t)) / statistics.median(t) for t in times.values()]
            print(f"| {rows} | {u:.3f} | {f:.3f} | {u / f:.3f}x | {spread[0]:.1%} / {spread[1]:.1%} |", flush=True)


if __name__ == "__main__":
    main()
