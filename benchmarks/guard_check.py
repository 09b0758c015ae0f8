"""Time Dynamo's guard check per call of a torchao-quantized LLaMA-like
model compiled with fxfuse: all guards, `fxfuse.guard_filter`, and (for
scale) torch's `skip_guard_on_all_nn_modules_unsafe`. The guard check is
host time spent before every call of the compiled code, whatever the
device; this measures that check alone (the frame's guard manager), with
the inner compiler "eager".

    python3 benchmarks/guard_check.py --layers 16 --config int8wo
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tabulate import tabulate

from llama_decode import torchao_config  # the benchmark's configs, by the same names

import fxfuse
from fxfuse.models import LlamaConfig, Transformer, load_hand_fused


def quantized(layers: int, config: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The model, and the same fused by hand (wqkv, w13) before quantize_."""
    from torchao.quantization import quantize_

    torch.manual_seed(0)
    cfg = LlamaConfig(n_layer=layers)
    model = Transformer(cfg).to(torch.bfloat16).eval()
    hand = load_hand_fused(Transformer(cfg, hand_fused=True).to(torch.bfloat16), model).eval()
    for m in (model, hand):
        quantize_(m, torchao_config(config))
    return model, hand


def guard_us(model: torch.nn.Module, tokens: torch.Tensor, backend, guard_filter, calls: int, repeats: int) -> tuple:
    """Median µs of one guard check over `repeats` runs of `calls` checks,
    and the number of guards the filter left out."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    options = {"guard_filter_fn": guard_filter} if guard_filter else None
    fn = torch.compile(model, backend=backend, options=options)
    fn(tokens)
    entries = _debug_get_cache_entry_list(type(model).forward.__code__)
    assert len(entries) == 1, f"expected one compiled entry, got {len(entries)}"
    check = entries[0].guard_manager.check
    frame = {"self": model, "tokens": tokens, "pos": None}  # the locals of Transformer.forward
    assert check(frame), entries[0].guard_manager.check_verbose(frame)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            check(frame)
        times.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(times), (max(times) - min(times)) / statistics.median(times), \
        counters["fxfuse"]["python_guards_skipped"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--config", default="int8wo", choices=["int8wo", "float8wo"], help="as llama_decode.py names them")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    model, hand = quantized(args.layers, args.config)
    tokens = torch.randint(0, 128, (1, 1))
    params = sum(1 for w in model.parameters() if hasattr(w, "__tensor_flatten__"))
    variants = [
        ("unfused, all guards", model, "eager", None),
        ("hand_fused, all guards", hand, "eager", None),
        ("fxfuse, all guards", model, fxfuse.backend(inner="eager"), None),
        ("fxfuse, fxfuse.guard_filter", model, fxfuse.backend(inner="eager"), fxfuse.guard_filter),
        ("fxfuse, skip_guard_on_all_nn_modules_unsafe", model, fxfuse.backend(inner="eager"),
         torch.compiler.skip_guard_on_all_nn_modules_unsafe),
    ]
    rows = []
    with torch.no_grad():
        base = None
        for name, m, backend, guard_filter in variants:
            us, spread, skipped = guard_us(m, tokens, backend, guard_filter, args.calls, args.repeats)
            base = base or us
            rows.append([name, f"{us:.1f}", f"{us / base:.3f}", f"{spread:.1%}", skipped])
    print(f"{torch.__version__}, {args.layers} layers, {params} {args.config} weights; "
          f"medians of {args.repeats} x {args.calls} guard checks")
    print(tabulate(rows, headers=["variant", "guard check µs", "vs unfused", "spread", "guards left out"],
                   tablefmt="github"))


if __name__ == "__main__":
    main()
