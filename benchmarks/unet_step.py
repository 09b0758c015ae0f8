#!/usr/bin/env python
"""One denoising step of a Stable-Diffusion-1.5-shaped U-Net (diffusers'
UNet2DConditionModel from its config, random weights), compiled several
ways and timed in one process:

  inductor       torch.compile(unet)
  fxfuse         fxfuse.backend(): the cost gate decides each group
  fxfuse_all     fxfuse.backend(min_speedup=None): every legal group fused
  fxfuse_512     fxfuse.backend(min_speedup=None, max_rows=512): the old default
  diffusers      unet.fuse_qkv_projections(), then torch.compile (a copy of the model)

    GPU:        python benchmarks/unet_step.py            (fp16, batch 2, 64x64 latents, 77 text tokens)
    CPU smoke:  python benchmarks/unet_step.py --tiny --iters 2 --repeats 2

Default compile mode (no CUDA graphs), as diffusers' docs compile the U-Net.
Variants are timed round-robin; each repeat is the mean of --iters steps;
the table gives the median of --repeats and the ratio to inductor in the
same run.
"""
from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fxfuse  # noqa: E402

VARIANTS = ("inductor", "fxfuse", "fxfuse_all", "fxfuse_512", "diffusers")
GiB = 2**30


def build(tiny: bool, dev, dtype):
    from diffusers import UNet2DConditionModel

    if tiny:
        cfg = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                   norm_num_groups=8, attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        shapes = ((2, 4, 8, 8), (2, 7, 32))
    else:  # SD 1.5: the class defaults with 768-wide text embeddings and 64x64 latents
        cfg = dict(sample_size=64, cross_attention_dim=768)
        shapes = ((2, 4, 64, 64), (2, 77, 768))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg).to(dev, dtype).eval()
    g = torch.Generator(device=dev).manual_seed(1)
    latents = torch.randn(shapes[0], device=dev, dtype=dtype, generator=g)
    text = torch.randn(shapes[1], device=dev, dtype=dtype, generator=g)
    t = torch.tensor(500, device=dev)
    return unet, (latents, t, text)


def make(name, unet, mode=None):
    if name == "inductor":
        return unet, torch.compile(unet, mode=mode), None
    if name == "diffusers":
        fused = copy.deepcopy(unet)
        fused.fuse_qkv_projections()
        return fused, torch.compile(fused, mode=mode), None
    opts = {"fxfuse": {}, "fxfuse_all": {"min_speedup": None},
            "fxfuse_512": {"min_speedup": None, "max_rows": 512}}[name]
    be = fxfuse.backend(mode=mode, **opts)
    return unet, torch.compile(unet, backend=be), be


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--mode", default=None, help="torch.compile mode for every variant, e.g. reduce-overhead")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev, dtype = (torch.device("cuda"), torch.float16) if cuda else (torch.device("cpu"), torch.float32)
    card = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"card: {card}, torch {torch.__version__}, {dtype}, mode {args.mode}, command: {' '.join(sys.argv)}",
          flush=True)
    unet, inputs = build(args.tiny, dev, dtype)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def mark():  # CUDA graphs (reduce-overhead): each call is a new step
        if args.mode and cuda:
            torch.compiler.cudagraph_mark_step_begin()

    def mem():
        gc.collect()
        sync()
        return torch.cuda.memory_allocated() if cuda else 0

    with torch.no_grad():
        ref = unet(*inputs).sample.float()
    runs, info = {}, {}
    t0 = time.perf_counter()
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        before = mem()
        model, fn, be = make(name, unet, args.mode)
        start = time.perf_counter()
        with torch.no_grad():
            mark()
            out = fn(*inputs).sample.float()
            mark()
            fn(*inputs)
        sync()
        err = ((out - ref).norm() / ref.norm()).item()
        extra = (mem() - before) / GiB
        note = ""
        if be is not None:
            r = be.report
            fused = sum(d.fused for d in r.gate)
            note = (f"{r.before} -> {r.after} linear calls, {len(r.groups)} groups; gate: {fused} sets fused, "
                    f"{len(r.gate) - fused} left alone; skipped {dict(r.skipped)}")
            for d in r.gate:
                if not d.fused:
                    print(f"  {name}: left alone: input {d.input}: {d}", flush=True)
        info[name] = dict(compile_s=time.perf_counter() - start, rel_err=err, extra_gib=extra, note=note)
        runs[name] = (fn, [])
        print(f"[{time.perf_counter() - t0:6.1f}s] {name}: compiled in {info[name]['compile_s']:.1f}s, "
              f"rel. error vs eager {err:.2e}, extra GiB {extra:.2f}. {note}", flush=True)
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, (fn, times) in runs.items():
                sync()
                t = time.perf_counter()
                for _ in range(args.iters):
                    mark()
                    fn(*inputs)
                sync()
                times.append((time.perf_counter() - t) / args.iters * 1e3)
    base = statistics.median(runs["inductor"][1]) if "inductor" in runs else None
    best = min(runs["inductor"][1]) if "inductor" in runs else None
    print("\n| variant | step ms (median) | vs inductor | spread | best ms | best vs inductor's best | extra GiB "
          "| rel. err vs eager | repeats (ms) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (_, times) in runs.items():
        med = statistics.median(times)
        spread = (max(times) - min(times)) / med * 100
        ratio = f"{base / med:.3f}x" if base else "-"
        bratio = f"{best / min(times):.3f}x" if best else "-"
        print(f"| {name} | {med:.2f} | {ratio} | {spread:.1f}% | {min(times):.2f} | {bratio} | {info[name]['extra_gib']:.2f} | "
              f"{info[name]['rel_err']:.1e} | {', '.join(f'{t:.2f}' for t in times)} |", flush=True)


if __name__ == "__main__":
    main()
