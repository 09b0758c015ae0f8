#!/usr/bin/env python
"""Training step (forward + backward) of LLaMA-7B-sized layers: does fusing
pay when gradients are needed?

Variants, measured in one process, round-robin, medians:
  unfused      torch.compile(layers)                           inductor
  fxfuse       torch.compile(layers, backend=fxfuse.backend(training=True)): GEMM over an
               in-graph torch.cat of the weights (autograd needs the members)
  hand_fused   torch.compile(hand-fused layers)                 wqkv / w13 as parameters

  python benchmarks/llama_train.py --layers 4 --tokens 4096 --out DIR
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fxfuse.models import LlamaConfig, Transformer, load_hand_fused  # noqa: E402

VARIANTS = ("unfused", "fxfuse", "hand_fused")


class Layers(torch.nn.Module):
    """The decoder layers alone (no embedding or head, which do not fuse)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.layers = model.layers
        self.register_buffer("cos", model.cos, persistent=False)
        self.register_buffer("sin", model.sin, persistent=False)

    def forward(self, x):
        S = x.shape[1]
        cos = self.cos[:S].unsqueeze(1).to(x.dtype)
        sin = self.sin[:S].unsqueeze(1).to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, None)
        return x


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--iters", type=int, default=10, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="tiny config on CPU (smoke test)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = (LlamaConfig(n_layer=2, max_seq=args.tokens) if args.tiny
           else LlamaConfig.llama2_7b(n_layer=args.layers, max_seq=args.tokens))
    torch.manual_seed(0)
    with torch.device(dev):
        plain = Transformer(cfg).to(dtype)
        hand = load_hand_fused(Transformer(cfg, hand_fused=True).to(dtype), plain)
    import fxfuse

    be = fxfuse.backend(training=True)  # fuse although gradients are needed: that is what is measured
    fns = {
        "unfused": torch.compile(Layers(plain)),
        "fxfuse": torch.compile(Layers(plain), backend=be),
        "hand_fused": torch.compile(Layers(hand)),
    }
    x = torch.randn(1, args.tokens, cfg.dim, device=dev, dtype=dtype)
    grad = torch.randn_like(x)

    def step(fn):
        fn(x).backward(grad)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    res = {n: {"ms": []} for n in fns}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        for _ in range(3):
            step(fn)
        sync()
        res[name]["compile_s"] = time.perf_counter() - t0
    # Gradients agree: one step each from zeroed grads, compare a fused weight's grad.
    grads = {}
    for name, fn in fns.items():
        for m in (plain, hand):
            m.zero_grad(set_to_none=True)
        step(fn)
        m = hand if name == "hand_fused" else plain
        a = m.layers[0].attention
        grads[name] = (a.wqkv.weight.grad[: cfg.dim] if name == "hand_fused" else a.wq.weight.grad).float()
    ref = grads["unfused"]
    for name, g in grads.items():
        res[name]["wq_grad_rel_err"] = ((g - ref).norm() / ref.norm()).item()
    res["fxfuse"]["report"] = be.report.summary()
    for _ in range(args.repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                step(fn)
            sync()
            res[name]["ms"].append((time.perf_counter() - t0) * 1e3 / args.iters)
    base = statistics.median(res["unfused"]["ms"])
    lines = [f"card: {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, "
             f"{cfg.n_layer} layers dim {cfg.dim}, {args.tokens} tokens, {dtype}",
             f"command: {' '.join(sys.argv)}", "",
             "| variant | fwd+bwd ms (median) | vs unfused | runs | wq grad rel err vs unfused | compile s |",
             "|---|---|---|---|---|---|"]
    for name, r in res.items():
        med = statistics.median(r["ms"])
        lines.append(f"| {name} | {med:.2f} | {base / med:.3f}x | {', '.join(f'{v:.2f}' for v in r['ms'])} | "
                     f"{r['wq_grad_rel_err']:.1e} | {r['compile_s']:.1f} |")
    lines.append("\n" + res["fxfuse"]["report"])
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "train.md").write_text(text + "\n")
        (args.out / "train.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
