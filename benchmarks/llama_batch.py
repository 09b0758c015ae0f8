#!/usr/bin/env python
"""Decode at several batch sizes and prefill at several lengths, LLaMA-2-7B
shapes (random weights, bf16), unfused vs fxfuse with its defaults (the cost
gate), in one process. llama_decode.py measures batch 1 in depth; this is
the sweep over batch and prompt length, where the gate's decisions change.

    GPU:        python benchmarks/llama_batch.py --layers 2
    CPU smoke:  python benchmarks/llama_batch.py --tiny --batch 1 2 --prefill 16 --tokens 2 --repeats 2

Decode: `--tokens` greedy steps from a random cache, at position --pos, in
mode reduce-overhead (CUDA graphs). Prefill: one forward over the prompt,
same mode. Variants are timed round-robin; medians of --repeats; the ratio
is fxfuse over unfused within this run.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fxfuse  # noqa: E402
from fxfuse.models import LlamaConfig, Transformer  # noqa: E402


@torch.no_grad()  # inference, as in serving: weights that need gradients are left unfused
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--prefill", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--pos", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prefill-iters", type=int, default=10, help="prefill forwards per timed repeat")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    mode = "reduce-overhead" if cuda else None
    max_seq = max([args.pos + args.tokens, *args.prefill])
    max_seq = -(-max_seq // 256) * 256
    cfg = (LlamaConfig(n_layer=args.layers, max_seq=max_seq) if args.tiny
           else LlamaConfig.llama2_7b(n_layer=args.layers, max_seq=max_seq))
    print(f"card: {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, "
          f"{cfg.n_layer} layers dim {cfg.dim}, {dtype}, mode {mode}; command: {' '.join(sys.argv)}", flush=True)
    # Every batch size and prompt length compiles once per variant (static shapes).
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, 64)
    torch.manual_seed(0)
    with torch.device(dev):
        model = Transformer(cfg).to(dtype).eval()
    be = fxfuse.backend(mode=mode)
    # One model object per variant: compiled over the same module, Dynamo
    # (torch 2.11) served the second variant the first one's graph.
    models = {"unfused": model, "fxfuse": copy.deepcopy(model)}
    fns = {"unfused": torch.compile(models["unfused"], mode=mode, dynamic=False),
           "fxfuse": torch.compile(models["fxfuse"], backend=be, dynamic=False)}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step(fn, *a):
        if cuda:
            torch.compiler.cudagraph_mark_step_begin()
        return fn(*a)

    def gate_since(n):
        return "; ".join(dict.fromkeys(f"{d.why}: {'fused' if d.fused else 'left alone'}" for d in be.report.gate[n:]))

    rows = []
    for m in models.values():
        m.setup_cache(1)
    g = torch.Generator(device=dev).manual_seed(1)
    for n in args.prefill:
        prompt = torch.randint(0, cfg.vocab, (1, n), device=dev, generator=g)
        n0 = len(be.report.gate)
        for name, fn in fns.items():
            for _ in range(3):
                step(fn, prompt)
        times = {name: [] for name in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                sync()
                t = time.perf_counter()
                for _ in range(args.prefill_iters):
                    step(fn, prompt)
                sync()
                times[name].append((time.perf_counter() - t) / args.prefill_iters * 1e3)
        rows.append((f"prefill {n}", "ms", times, gate_since(n0)))
        print(f"prefill {n}: " + ", ".join(f"{k} {statistics.median(v):.2f} ms" for k, v in times.items())
              + f"; gate: {rows[-1][3]}", flush=True)
    for batch in args.batch:
        for m in models.values():
            m.setup_cache(batch)
        for la, lb in zip(models["unfused"].layers, models["fxfuse"].layers):
            for name in ("k_cache", "v_cache"):
                getattr(la.attention, name).normal_(generator=g)
                getattr(lb.attention, name).copy_(getattr(la.attention, name))
        tok0 = torch.randint(0, cfg.vocab, (batch, 1), device=dev, generator=g)
        pos = [torch.tensor([args.pos + i], device=dev) for i in range(args.tokens)]
        n0 = len(be.report.gate)
        ref = model(tok0, pos[0]).float()
        for name, fn in fns.items():
            for _ in range(3):
                out = step(fn, tok0, pos[0]).float()
            err = ((out - ref).norm() / ref.norm()).item()
            print(f"  decode batch {batch}: {name} rel. error vs eager {err:.2e}", flush=True)
        times = {name: [] for name in fns}
        for _ in range(args.repeats + 1):  # the first pass warms the whole loop up, untimed
            for name, fn in fns.items():
                tok = tok0
                sync()
                t = time.perf_counter()
                for i in range(args.tokens):
                    tok = step(fn, tok, pos[i])[:, -1].argmax(-1, keepdim=True)
                sync()
                times[name].append(batch * args.tokens / (time.perf_counter() - t))
        times = {name: t[1:] for name, t in times.items()}
        rows.append((f"decode batch {batch}", "tok/s", times, gate_since(n0)))
        print(f"decode batch {batch}: " + ", ".join(f"{k} {statistics.median(v):.1f} tok/s" for k, v in times.items())
              + f"; gate: {rows[-1][3]}", flush=True)
    print(be.report.summary(), dict(be.report.skipped), flush=True)
    print("\n| shape | unfused | fxfuse | fxfuse vs unfused | spread unfused / fxfuse | gate decisions (fxfuse) |")
    print("|---|---|---|---|---|---|")
    for shape, unit, times, gate in rows:
        u, f = statistics.median(times["unfused"]), statistics.median(times["fxfuse"])
        ratio = f / u if unit == "tok/s" else u / f
        spread = [(max(t) - min(t)) / statistics.median(t) * 100 for t in times.values()]
        print(f"| {shape} | {u:.2f} {unit} | {f:.2f} {unit} | {ratio:.3f}x | {spread[0]:.1f}% / {spread[1]:.1f}% | "
              f"{gate or 'no new graph'} |", flush=True)


if __name__ == "__main__":
    main()
