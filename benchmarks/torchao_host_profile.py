"""Where a torchao decode step spends its host time: the hand-fused model
(wqkv/w13 built before quantize_, Inductor) against fxfuse with
`fxfuse.guard_filter`, both with CUDA graphs (mode="reduce-overhead").
LLaMA-2-7B-shaped layers, batch 1, one decode step called again and again
with the same token (no sampling), in one process: host ms per call (the
time to enqueue 200 steps), total ms per call (after the GPU finished), then
a cProfile of 200 more steps, the 14 functions with the most own time.
GPU only.

    python3 benchmarks/torchao_host_profile.py --layers 16 --config float8dq_row
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from llama_decode import torchao_config  # the benchmark's configs, by the same names

import fxfuse
from fxfuse.models import LlamaConfig, Transformer, load_hand_fused


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--config", default="float8dq_row", choices=["float8dq_row", "int4"])
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()
    from torchao.quantization import quantize_

    torch.manual_seed(0)
    cfg = LlamaConfig(n_layer=args.layers, dim=4096, n_head=32, n_kv_head=32, hidden=11008, vocab=32000, max_seq=256)
    torch.set_default_dtype(torch.bfloat16)  # no fp32 copy of the weights on the card
    with torch.device("cuda"):
        plain = Transformer(cfg).eval()
        hand = load_hand_fused(Transformer(cfg, hand_fused=True), plain).eval()
    torch.set_default_dtype(torch.float32)
    for model in (plain, hand):
        quantize_(model, torchao_config(args.config))
    tok = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    pos = torch.tensor([5], device="cuda")
    torch.set_grad_enabled(False)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.layers} layers, {args.config}")
    variants = [("hand_fused", hand, dict(mode="reduce-overhead")),
                ("fxfuse + fxfuse.guard_filter", plain,
                 dict(backend=fxfuse.backend(mode="reduce-overhead"), options={"guard_filter_fn": fxfuse.guard_filter}))]
    for name, model, kwargs in variants:
        torch._dynamo.reset()
        fn = torch.compile(model, dynamic=False, **kwargs)

        def loop(n: int) -> None:
            for _ in range(n):
                torch.compiler.cudagraph_mark_step_begin()
                fn(tok, pos)

        loop(5)
        torch.cuda.synchronize()
        t = time.perf_counter()
        loop(args.steps)
        host = (time.perf_counter() - t) / args.steps * 1e3
        torch.cuda.synchronize()
        total = (time.perf_counter() - t) / args.steps * 1e3
        print(f"== {name}: host {host:.3f} ms/call, total {total:.3f} ms/call", flush=True)
        profile = cProfile.Profile()
        profile.enable()
        loop(args.steps)
        profile.disable()
        torch.cuda.synchronize()
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(14)
        print(out.getvalue()[-3500:], flush=True)


if __name__ == "__main__":
    main()
