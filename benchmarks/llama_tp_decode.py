#!/usr/bin/env python
"""Tensor-parallel decode: the LLaMA-2-7B-shaped model of llama_decode.py
(random weights, bf16, batch 1) sharded over 2 GPUs with PyTorch's own
tensor parallelism (ColwiseParallel on q/k/v and w1/w3, RowwiseParallel on
o and w2), compiled two ways on the same sharded model, in one run:

  unfused   torch.compile(model, mode=MODE)
  fxfuse    torch.compile(model, backend=fxfuse.backend(mode=MODE))

Each rank reports what fxfuse removed (with the local widths); rank 0 times
greedy decode (tok/s, median of round-robin repeats) and compares logits with
eager. NVLink multicast stays off (NCCL_NVLS_ENABLE=0).

  GPU (2 cards):  python benchmarks/llama_tp_decode.py --out .out
  CPU smoke:      python benchmarks/llama_tp_decode.py --tiny --tokens 4 --repeats 1 --mode none
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
import fxfuse  # noqa: E402
from fxfuse.models import LlamaConfig, Transformer  # noqa: E402

WORLD = 2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, help="default 32 (2 with --tiny)")
    p.add_argument("--tokens", type=int, default=128, help="tokens per timed generation")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--mode", default="reduce-overhead", help='compile mode; "none" for default')
    p.add_argument("--tiny", action="store_true", help="tiny config on CPU with gloo")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def shard(model: Transformer, mesh) -> None:
    """gpt-fast's plan, written with parallelize_module; each rank keeps
    1/WORLD of the heads, so attention works on local head counts."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    cfg = model.cfg
    local = dataclasses.replace(cfg, dim=cfg.dim // WORLD, n_head=cfg.n_head // WORLD,
                                n_kv_head=cfg.n_kv_head // WORLD)
    for layer in model.layers:
        parallelize_module(layer, mesh, {
            "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(), "attention.wo": RowwiseParallel(),
            "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(),
        })
        att = layer.attention
        att.cfg = local  # same head_dim, 1/WORLD of the heads
        shape = (1, local.n_kv_head, cfg.max_seq, cfg.head_dim)
        att.k_cache = torch.randn(shape, dtype=att.wo.weight.dtype, device=att.wo.weight.device)
        att.v_cache = torch.randn(shape, dtype=att.wo.weight.dtype, device=att.wo.weight.device)


def rank_main(rank: int, args, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0")
    cuda = not args.tiny
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=WORLD)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(dev.type, (WORLD,))
    cfg = LlamaConfig(n_layer=args.layers or 2, dim=64, n_head=4, n_kv_head=2, hidden=176, max_seq=64) \
        if args.tiny else LlamaConfig.llama2_7b(n_layer=args.layers or 32, max_seq=args.tokens + 8)
    torch.manual_seed(0)  # the same weights on every rank before sharding
    dtype = torch.bfloat16 if cuda else torch.float32
    with torch.device(dev):
        model = Transformer(cfg).to(dtype).eval()
    shard(model, mesh)
    mode = None if args.mode == "none" else args.mode
    pos = [torch.tensor([p], device=dev) for p in range(args.tokens + 1)]
    tok0 = torch.tensor([[1]], device=dev)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def generate(fn) -> tuple[float, torch.Tensor]:
        tok, first = tok0, None
        sync()
        t = time.perf_counter()
        for p in pos[: args.tokens]:
            if cuda and mode:
                torch.compiler.cudagraph_mark_step_begin()
            logits = fn(tok, p)
            if first is None:
                first = logits.float().clone()
            tok = logits[:, -1:].argmax(-1)
        sync()
        return args.tokens / (time.perf_counter() - t), first

    res: dict = {"rank": rank, "layers": cfg.n_layer, "mode": args.mode,
                 "device": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__}
    with torch.no_grad():
        _, ref = generate(model)
        be = fxfuse.backend(mode=mode)
        fns = {"unfused": torch.compile(model, mode=mode, dynamic=False),
               "fxfuse": torch.compile(model, backend=be, dynamic=False)}
        tps: dict = {k: [] for k in fns}
        for name, fn in fns.items():  # compile + warm up (CUDA graphs record on later calls)
            t = time.perf_counter()
            for _ in range(3):
                _, first = generate(fn)
            res[f"{name}_compile_and_warmup_s"] = round(time.perf_counter() - t, 1)
            res[f"{name}_rel_err_vs_eager"] = ((first - ref).norm() / ref.norm()).item()
        for _ in range(args.repeats):
            for name, fn in fns.items():
                tps[name].append(generate(fn)[0])
    res.update(removed=be.report.removed, groups=len(be.report.groups), skipped=dict(be.report.skipped),
               local_widths=sorted({tuple(g.widths) for g in be.report.groups}),
               weights=sorted({g.weights for g in be.report.groups}),
               tok_s={k: round(statistics.median(v), 1) for k, v in tps.items()},
               tok_s_all={k: [round(x, 1) for x in v] for k, v in tps.items()})
    res["speedup"] = round(res["tok_s"]["fxfuse"] / res["tok_s"]["unfused"], 3)
    Path(out, f"rank{rank}.json").write_text(json.dumps(res, indent=1))
    dist.barrier()
    # Tearing NCCL down can hang at exit; everything is written by now.
    os._exit(0)


def main(argv=None) -> None:
    import tempfile

    import torch.multiprocessing as mp

    args = parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(args, port, str(out)), nprocs=WORLD)
    ranks = [json.loads(Path(out, f"rank{i}.json").read_text()) for i in range(WORLD)]
    r0 = ranks[0]
    print(f"\n{r0['device']}, torch {r0['torch']}, {r0['layers']} layers, mode={r0['mode']}, "
          f"{WORLD} ranks, batch 1, {args.tokens} tokens x {args.repeats} repeats")
    print("| rank | removed | local widths | unfused tok/s | fxfuse tok/s | speedup | rel err fxfuse vs eager |")
    print("|---|---|---|---|---|---|---|")
    for r in ranks:
        print(f"| {r['rank']} | {r['removed']} | {r['local_widths']} | {r['tok_s']['unfused']} | "
              f"{r['tok_s']['fxfuse']} | {r['speedup']}x | {r['fxfuse_rel_err_vs_eager']:.2e} |")
    (out / "results.json").write_text(json.dumps(ranks, indent=1))


if __name__ == "__main__":
    main()
