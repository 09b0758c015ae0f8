#!/usr/bin/env python
"""One denoising step of a diffusers model built from its config (random
weights, no download), compiled several ways and timed in one process:

  inductor     torch.compile(model)
  fxfuse       fxfuse.backend(): the cost gate decides each group
  fxfuse_all   fxfuse.backend(min_speedup=None): every legal group fused
  diffusers    model.fuse_qkv_projections() on a copy, then torch.compile

Models (--model), each with the inputs of a 1024x1024 image where the
model is run at that size (512x512 for SD 1.5), as its pipeline calls it:

  sd15   UNet2DConditionModel, SD 1.5 config; fp16, batch 2 (classifier-free
         guidance), 64x64 latents, 77 x 768 text embeddings
  sdxl   UNet2DConditionModel, SDXL base config; fp16, batch 2, 128x128
         latents, 77 x 2048 text embeddings, pooled 1280 + 6 time ids.
         --layers: transformer layers per block at the 1280-wide level (10; default 4)
  sd3    SD3Transformer2DModel, SD3-medium shapes; fp16, batch 2, 128x128
         latents (4096 image tokens), 333 x 4096 text tokens (77 CLIP + 256
         T5), pooled 2048. --layers: joint blocks (24; default 12)
  flux   FluxTransformer2DModel, Flux-dev shapes; bf16, batch 1 (guidance
         distilled: guidance 3.5 as an input), 4096 image tokens of 64
         channels, 512 x 4096 text tokens, pooled 768, image and text ids.
         --layers N: N double blocks and 2N single blocks (19 and 38; default 6)

    GPU:        python benchmarks/diffusers_step.py --model sdxl
    CPU smoke:  python benchmarks/diffusers_step.py --model sdxl --tiny --iters 2 --repeats 2

Variants are compiled one after the other (progress lines with elapsed
seconds), then timed round-robin after one untimed round: each repeat is
the mean of --iters steps. The table gives the median and the best repeat
of each variant, each as a ratio to inductor's in the same run, the
allocated memory the variant added (diffusers: after copying the model, so
the copy itself is not counted), the relative error against eager, and the
linear calls per step. Everything runs under torch.no_grad(), as pipelines
do. benchmarks/unet_step.py is the older SD 1.5 script; `--model sd15`
times the same model.
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
from fxfuse.match import count_linears  # noqa: E402

VARIANTS = ("inductor", "fxfuse", "fxfuse_all", "diffusers")
MODELS = ("sd15", "sdxl", "sd3", "flux")
# Chosen so that compiling the four variants fits in a few minutes on one
# GPU; the full depth is in brackets (docs/benchmarks.md has the estimates).
DEFAULT_LAYERS = {"sd15": None, "sdxl": 4, "sd3": 12, "flux": 6}  # full: -, 10, 24, 19 (+38 single)
GiB = 2**30


def build_sd15(tiny, layers):
    from diffusers import UNet2DConditionModel

    if tiny:
        cfg = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                   norm_num_groups=8, attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        batch, latent, text = 2, (4, 8, 8), (7, 32)
    else:
        cfg = dict(sample_size=64, cross_attention_dim=768)
        batch, latent, text = 2, (4, 64, 64), (77, 768)
    model = UNet2DConditionModel(**cfg)

    def inputs(dev, dtype, g):
        return dict(sample=torch.randn(batch, *latent, device=dev, dtype=dtype, generator=g),
                    timestep=torch.tensor(500, device=dev),
                    encoder_hidden_states=torch.randn(batch, *text, device=dev, dtype=dtype, generator=g))
    return model, inputs


def build_sdxl(tiny, layers):
    from diffusers import UNet2DConditionModel

    common = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  addition_embed_type="text_time", use_linear_projection=True)
    if tiny:
        cfg = dict(layers_per_block=1, sample_size=16, block_out_channels=(16, 32, 64),
                   transformer_layers_per_block=(1, 1, layers or 2), attention_head_dim=(2, 4, 8), cross_attention_dim=32, norm_num_groups=8,
                   addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)
        batch, latent, text, pooled = 2, (4, 16, 16), (7, 32), 16
    else:  # stabilityai/stable-diffusion-xl-base-1.0's unet/config.json
        cfg = dict(layers_per_block=2, sample_size=128, block_out_channels=(320, 640, 1280),
                   transformer_layers_per_block=(1, 2, layers or 10), attention_head_dim=(5, 10, 20),
                   cross_attention_dim=2048, addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
        batch, latent, text, pooled = 2, (4, 128, 128), (77, 2048), 1280
    model = UNet2DConditionModel(**common, **cfg)

    def inputs(dev, dtype, g):
        # time ids: original size, crop top-left, target size
        size = latent[-1] * 8
        time_ids = torch.tensor([size, size, 0, 0, size, size], device=dev, dtype=dtype).repeat(batch, 1)
        return dict(sample=torch.randn(batch, *latent, device=dev, dtype=dtype, generator=g),
                    timestep=torch.tensor(500, device=dev),
                    encoder_hidden_states=torch.randn(batch, *text, device=dev, dtype=dtype, generator=g),
                    added_cond_kwargs=dict(text_embeds=torch.randn(batch, pooled, device=dev, dtype=dtype, generator=g),
                                           time_ids=time_ids))
    return model, inputs


def build_sd3(tiny, layers):
    from diffusers import SD3Transformer2DModel

    if tiny:
        cfg = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=layers or 2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                   pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16)
        batch, latent, text, pooled = 2, (4, 8, 8), (8, 32), 32
    else:  # stabilityai/stable-diffusion-3-medium-diffusers's transformer/config.json
        cfg = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=layers or 24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
        batch, latent, text, pooled = 2, (16, 128, 128), (77 + 256, 4096), 2048
    model = SD3Transformer2DModel(**cfg)

    def inputs(dev, dtype, g):
        return dict(hidden_states=torch.randn(batch, *latent, device=dev, dtype=dtype, generator=g),
                    encoder_hidden_states=torch.randn(batch, *text, device=dev, dtype=dtype, generator=g),
                    pooled_projections=torch.randn(batch, pooled, device=dev, dtype=dtype, generator=g),
                    timestep=torch.full((batch,), 500.0, device=dev, dtype=dtype))
    return model, inputs


def build_flux(tiny, layers):
    from diffusers import FluxTransformer2DModel

    if tiny:
        cfg = dict(patch_size=1, in_channels=4, num_layers=layers or 2, num_single_layers=2 * (layers or 2),
                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                   guidance_embeds=True, axes_dims_rope=(4, 6, 6))
        batch, side, text, pooled = 1, 4, (8, 32), 32
    else:  # black-forest-labs/FLUX.1-dev's transformer/config.json
        cfg = dict(patch_size=1, in_channels=64, num_layers=layers or 19, num_single_layers=2 * (layers or 19),
                   attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                   pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
        batch, side, text, pooled = 1, 64, (512, 4096), 768  # 128x128 latents packed 2x2: 64x64 tokens
    model = FluxTransformer2DModel(**cfg)

    def inputs(dev, dtype, g):
        img_ids = torch.zeros(side, side, 3, device=dev, dtype=dtype)  # as FluxPipeline builds them
        img_ids[..., 1] += torch.arange(side, device=dev, dtype=dtype)[:, None]
        img_ids[..., 2] += torch.arange(side, device=dev, dtype=dtype)[None, :]
        return dict(hidden_states=torch.randn(batch, side * side, cfg["in_channels"], device=dev, dtype=dtype,
                                              generator=g),
                    encoder_hidden_states=torch.randn(batch, *text, device=dev, dtype=dtype, generator=g),
                    pooled_projections=torch.randn(batch, pooled, device=dev, dtype=dtype, generator=g),
                    timestep=torch.full((batch,), 0.5, device=dev, dtype=dtype),
                    guidance=torch.full((batch,), 3.5, device=dev, dtype=dtype),
                    img_ids=img_ids.reshape(side * side, 3), txt_ids=torch.zeros(text[0], 3, device=dev, dtype=dtype))
    return model, inputs


BUILDERS = {"sd15": build_sd15, "sdxl": build_sdxl, "sd3": build_sd3, "flux": build_flux}
GPU_DTYPE = {"sd15": torch.float16, "sdxl": torch.float16, "sd3": torch.float16, "flux": torch.bfloat16}


def build(name, tiny, layers, dev, dtype):
    """(model in eval mode on dev, keyword inputs of one step)."""
    torch.manual_seed(0)
    with dev:  # initialised where it runs: billions of random weights are slow to make on the host
        model, inputs = BUILDERS[name](tiny, layers)
    model = model.to(dev, dtype).eval()
    kwargs = inputs(dev, dtype, torch.Generator(device=dev).manual_seed(1))
    return model, {**kwargs, "return_dict": False}


def linear_calls(model, kwargs) -> int:
    """Linear calls in the graphs Dynamo captures of one step (nothing compiled)."""
    counts = []

    def count(gm, example_inputs):
        counts.append(count_linears(gm))
        return gm.forward

    torch.compile(model, backend=count)(**kwargs)
    torch._dynamo.reset()
    return sum(counts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, default="sdxl")
    p.add_argument("--layers", type=int, default=None,
                   help="depth (see above); default: sdxl 4, sd3 12, flux 6 (tiny: 2)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--mode", default=None, help="torch.compile mode for every variant, e.g. reduce-overhead")
    p.add_argument("--dtype", default=None, help="float16 or bfloat16 (default: as the model is run; CPU: float32)")
    p.add_argument("--tiny", action="store_true", help="tiny config for a CPU smoke run")
    args = p.parse_args(argv)
    if args.layers is None and not args.tiny:
        args.layers = DEFAULT_LAYERS[args.model]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (GPU_DTYPE[args.model] if cuda else torch.float32)
    # Each variant compiles the step once more (four backends on one forward).
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 16))

    command = (f"python3 benchmarks/diffusers_step.py --model {args.model}"
               + (f" --layers {args.layers}" if args.layers is not None else "")
               + f" --variants {','.join(variants)} --iters {args.iters} --repeats {args.repeats}"
               + (f" --mode {args.mode}" if args.mode else "") + (f" --dtype {args.dtype}" if args.dtype else "")
               + (" --tiny" if args.tiny else ""))
    card = torch.cuda.get_device_name() if cuda else "cpu"
    import diffusers

    print(f"card: {card}, torch {torch.__version__}, diffusers {diffusers.__version__}, {dtype}, "
          f"mode {args.mode}\ncommand: {command}", flush=True)
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

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

    model, kwargs = build(args.model, args.tiny, args.layers, dev, dtype)
    params = sum(p.numel() for p in model.parameters())
    log(f"built {type(model).__name__} ({params / 1e9:.2f} B parameters, {mem() / GiB:.2f} GiB allocated)")
    runs, info = {}, {}
    with torch.no_grad():
        ref = model(**kwargs)[0].float()
        log(f"eager step done; output {tuple(ref.shape)}, finite: {bool(ref.isfinite().all())}")
        diffusers_copy = None
        if "diffusers" in variants:
            # Copied before fxfuse moves any weight; counted before anything is compiled
            # (torch._dynamo.reset() would drop the compiled variants).
            diffusers_copy = copy.deepcopy(model)
            copied = mem()
            diffusers_copy.fuse_qkv_projections()  # new fused weights; the old ones stay
            fuse_gib = (mem() - copied) / GiB
            info["diffusers"] = dict(calls=str(linear_calls(diffusers_copy, kwargs)), fuse_gib=fuse_gib)
            log(f"diffusers: fuse_qkv_projections() on a copy added {fuse_gib:.2f} GiB; "
                f"{info['diffusers']['calls']} linear calls per step")
        for name in variants:
            before = mem()
            be = None
            if name == "inductor":
                fn = torch.compile(model, mode=args.mode)
            elif name == "diffusers":
                fn = torch.compile(diffusers_copy, mode=args.mode)
            else:
                be = fxfuse.backend(mode=args.mode, **({"min_speedup": None} if name == "fxfuse_all" else {}))
                fn = torch.compile(model, backend=be)
            start = time.perf_counter()
            mark()
            out = fn(**kwargs)[0].float()
            mark()
            fn(**kwargs)
            sync()
            compile_s = time.perf_counter() - start
            err = ((out - ref).norm() / ref.norm()).item()
            extra = (mem() - before) / GiB + info.get(name, {}).get("fuse_gib", 0.0)
            row = info.setdefault(name, {})
            row.update(compile_s=compile_s, rel_err=err, extra_gib=extra, note="")
            if be is not None:
                r = be.report
                fused = sum(d.fused for d in r.gate)
                row["calls"] = f"{r.before} -> {r.after}"
                row["note"] = (f"{r.before} -> {r.after} linear calls, {len(r.groups)} groups, {r.graphs} graph(s); "
                               f"gate: {fused} sets fused, {len(r.gate) - fused} left alone; "
                               f"skipped {dict(r.skipped)}")
                for d in r.gate:
                    if not d.fused:
                        print(f"  {name}: left alone: input {d.input}: {d}", flush=True)
                if r.errors:
                    print(f"  {name}: errors: {r.errors}", flush=True)
            runs[name] = (fn, [])
            log(f"{name}: compiled and ran twice in {compile_s:.1f}s, rel. error vs eager {err:.2e}, "
                f"extra GiB {extra:.2f}. {row['note']}")
        if "inductor" in info and "fxfuse" in info:
            info["inductor"]["calls"] = info["fxfuse"]["calls"].split(" ->")[0]

        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        for rep in range(args.repeats + 1):  # the first round is a warm-up, not recorded
            for name, (fn, times) in runs.items():
                sync()
                t = time.perf_counter()
                for _ in range(args.iters):
                    mark()
                    fn(**kwargs)
                sync()
                if rep:
                    times.append((time.perf_counter() - t) / args.iters * 1e3)
        log("timed")
        if torch._dynamo.utils.counters["stats"]["unique_graphs"] != graphs:
            log("WARNING: something recompiled while being timed: timings include compiles")

    base = statistics.median(runs["inductor"][1]) if "inductor" in runs else None
    best = min(runs["inductor"][1]) if "inductor" in runs else None
    print(f"\n{command}\n")
    print("| variant | step ms (median) | vs inductor | spread | best ms | best vs inductor's best | extra GiB "
          "| rel. err vs eager | linear calls | compile s | repeats (ms) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (_, times) in runs.items():
        med = statistics.median(times)
        spread = (max(times) - min(times)) / med * 100
        ratio = f"{base / med:.3f}x" if base else "-"
        bratio = f"{best / min(times):.3f}x" if best else "-"
        i = info[name]
        print(f"| {name} | {med:.2f} | {ratio} | {spread:.1f}% | {min(times):.2f} | {bratio} | {i['extra_gib']:.2f} | "
              f"{i['rel_err']:.1e} | {i.get('calls', '-')} | {i['compile_s']:.1f} | "
              f"{', '.join(f'{t:.2f}' for t in times)} |", flush=True)


if __name__ == "__main__":
    main()
