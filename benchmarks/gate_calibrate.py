#!/usr/bin/env python
"""Calibrate the cost gate: one fused GEMM + split against the separate GEMMs,
over a grid of rows, K and widths, and the device's two ceilings.

    python benchmarks/gate_calibrate.py [--out results.json] [--quick]

Each point times, inside one CUDA graph, 10 back-to-back copies of the
sequence (separate: k `F.linear` calls; fused: one `F.linear` over the
concatenated weight, then `split`), each copy on its own inputs and weights
so that the L2 cache holds none of them (as between the layers of a model).
GPU time only: the launch cost that a CUDA graph removes is not counted, so
a fused GEMM that wins here wins without it too. Fused and separate are
timed alternately; the median of --repeats.

The ceilings (MiB/s of a device-to-device copy, counting bytes read and
written; TFLOP/s of a large bf16 GEMM) are measured first: cost.py's model
for the device is fitted against these points.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

CASES = {  # name: (K, widths)
    "llama7b_qkv": (4096, [4096] * 3),
    "llama7b_w1w3": (4096, [11008] * 2),
    "unet_qkv_320": (320, [320] * 3),
    "unet_qkv_640": (640, [640] * 3),
    "unet_qkv_1280": (1280, [1280] * 3),
    "unet_kv_text_320": (768, [320] * 2),
    "unet_kv_text_1280": (768, [1280] * 2),
    "sd3_adaln": (1536, [9216] * 4),
    "narrow_256": (2048, [256] * 2),
}
ROWS = [1, 8, 64, 154, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
COPIES = 10


def ceilings(dev):
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    ms = _time(lambda: b.copy_(a), 10)
    bw = 2 * n / (ms / 1e3) / 1e9
    x = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        x @ y
    ms = _time(lambda: x @ y, 10)
    return bw, 2 * 8192 ** 3 / (ms / 1e3) / 1e12


def _time(fn, iters):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def point(dev, dtype, rows, k, widths, repeats):
    n = sum(widths)
    per_copy = (rows * k + n * k + rows * n) * 2
    sets = max(1, min(COPIES, -(-(256 << 20) // per_copy)))  # enough to spill the 60 MB L2
    xs = [torch.randn(rows, k, device=dev, dtype=dtype) for _ in range(sets)]
    wss = [[torch.randn(w, k, device=dev, dtype=dtype) / k ** 0.5 for w in widths] for _ in range(sets)]
    wfs = [torch.cat(ws) for ws in wss]

    def separate():
        for i in range(COPIES):
            for w in wss[i % sets]:
                F.linear(xs[i % sets], w)

    def fused():
        for i in range(COPIES):
            F.linear(xs[i % sets], wfs[i % sets]).split(widths, -1)

    graphs = {}
    for name, fn in (("separate", separate), ("fused", fused)):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        graphs[name] = g
    for g in graphs.values():
        g.replay()
    once = _time(graphs["separate"].replay, 1)
    iters = max(3, min(50, int(20 / max(once, 1e-3))))  # about 20 ms per timing
    times = {"separate": [], "fused": []}
    for _ in range(repeats):
        for name, g in graphs.items():
            times[name].append(_time(g.replay, iters) / COPIES * 1e3)  # us per copy
    sep, fus = statistics.median(times["separate"]), statistics.median(times["fused"])
    del graphs, xs, wss, wfs
    return sep, fus, times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out")
    p.add_argument("--quick", action="store_true", help="fewer points (a smoke test)")
    args = p.parse_args(argv)
    dev, dtype = torch.device("cuda"), torch.bfloat16
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}, {dtype}")
    print(f"command: {' '.join(sys.argv)}")
    bw, tflops = ceilings(dev)
    print(f"copy bandwidth {bw:.0f} GB/s (read + write); bf16 GEMM 8192^3 {tflops:.0f} TFLOP/s\n")
    results = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_GBps": bw,
               "gemm_TFLOPs": tflops, "points": []}
    print("| case | K | widths | rows | separate us | fused us | fused speedup | spread sep / fused |")
    print("|---|---|---|---|---|---|---|---|")
    cases = list(CASES.items())[:2] if args.quick else CASES.items()
    for name, (k, widths) in cases:
        for rows in ROWS[::4] if args.quick else ROWS:
            if rows * sum(widths) * k > 4 * 32768 * 4096 * 12288:
                continue
            sep, fus, times = point(dev, dtype, rows, k, widths, args.repeats)
            spread = [(max(t) - min(t)) / statistics.median(t) * 100 for t in times.values()]
            print(f"| {name} | {k} | {'+'.join(map(str, widths))} | {rows} | {sep:.2f} | {fus:.2f} | "
                  f"{sep / fus:.3f}x | {spread[0]:.1f}% / {spread[1]:.1f}% |", flush=True)
            results["points"].append({"case": name, "k": k, "widths": widths, "rows": rows,
                                      "separate_us": sep, "fused_us": fus, "runs": times})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
