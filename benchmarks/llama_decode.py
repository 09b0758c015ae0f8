#!/usr/bin/env python
"""Decode and prefill speed of a LLaMA-2-7B-shaped model (random weights, bf16,
batch 1) compiled four ways, all measured in one process:

  unfused     torch.compile(plain, mode=MODE)                      inductor
  fxfuse      torch.compile(plain, backend="fxfuse", mode=MODE)
  hand_fused  torch.compile(hand-fused copy, mode=MODE)             gpt-fast-style wqkv/w13
  freezing    inductor with freezing=True on the plain model
  fxfuse_cat  fxfuse with weights="cat": the fused weight is a torch.cat in the
              graph (what a naive rewrite does), to show what the storage saves

For each: compile time, extra GPU memory, decode tok/s and prefill ms (medians
of round-robin repeats), logits vs eager, and whether the variant still agrees
with eager after every weight is scaled in place (freezing bakes weights into
the compiled code; a backend that copies weights at compile time would too).

  GPU:        python benchmarks/llama_decode.py --out .out
  CPU smoke:  python benchmarks/llama_decode.py --tiny --variants unfused,hand_fused,freezing \
                  --tokens 8 --repeats 2 --prefill 16

torchao (``quantize_`` after building each model; the hand-fused copy is
quantized after its wqkv/w13 are built, as torchao's own hand fusion does):

  python benchmarks/llama_decode.py --torchao int8wo,int8dq,float8dq_row --layers 8 --prefill 0
  python benchmarks/llama_decode.py --torchao int4 --layers 4 --prefill 0
  CPU smoke:  python benchmarks/llama_decode.py --tiny --torchao int8wo,float8wo --tokens 8 --repeats 2 --prefill 0

runs the variants unfused, hand_fused and fxfuse for each config in turn and
prints one table per config. The in-place check halves every quantized
weight's scales (torchao's tensors have no in-place multiply).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch._inductor.config
from torch._dynamo.utils import counters

# Run from a checkout without installing (the GPU machine has no registry).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fxfuse.models import LlamaConfig, Transformer, load_hand_fused, quantize_int8  # noqa: E402

VARIANTS = ("unfused", "fxfuse", "hand_fused", "freezing", "fxfuse_cat")
TORCHAO_VARIANTS = "unfused,hand_fused,fxfuse"  # hand fusion first: it tells what is reachable
GiB = 2**30


def torchao_config(name):
    """torchao 0.18 configs by short name. set_inductor_config=False: every
    variant compiles under the same Inductor settings (the default would set
    process-wide flags on the first quantize_)."""
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig,
                                      Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig,
                                      Int8WeightOnlyConfig, PerRow, PerTensor)

    configs = {
        "int8wo": lambda: Int8WeightOnlyConfig(set_inductor_config=False),
        "int8dq": lambda: Int8DynamicActivationInt8WeightConfig(set_inductor_config=False),
        "float8wo": lambda: Float8WeightOnlyConfig(set_inductor_config=False),
        "float8dq_row": lambda: Float8DynamicActivationFloat8WeightConfig(
            granularity=PerRow(), set_inductor_config=False),
        "float8dq_tensor": lambda: Float8DynamicActivationFloat8WeightConfig(
            granularity=PerTensor(), set_inductor_config=False),
        # tinygemm (`_weight_int4pack_mm`, CUDA): the one int4 format with a
        # kernel in torch alone; plain and preshuffled need mslk.
        "int4": lambda: Int4WeightOnlyConfig(
            group_size=128, int4_packing_format="tile_packed_to_4d", set_inductor_config=False),
        # The CPU tinygemm (`_weight_int4pack_mm_for_cpu`), for a --tiny smoke
        # run; group 32 since the tiny model's K is 64.
        "int4_cpu": lambda: _prototype_int4(group_size=32, set_inductor_config=False),
    }
    configs["int4wo"] = configs["int4"]
    if name not in configs:
        sys.exit(f"unknown --torchao config {name!r}; choose from {sorted(configs)}")
    return configs[name]()


def _prototype_int4(**kwargs):
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

    return PrototypeInt4WeightOnlyConfig(**kwargs)


def quantized_inner(model):
    """(name, inner tensor) of every torchao weight (qdata, scale, zero point)."""
    out = []
    for n, p in model.named_parameters():
        if hasattr(p, "__tensor_flatten__"):
            out += [(f"{n}.{k}", getattr(p, k)) for k in p.__tensor_flatten__()[0]]
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, help="default 32 (2 with --tiny)")
    p.add_argument("--tokens", type=int, default=128, help="tokens per timed generation")
    p.add_argument("--repeats", type=int, default=5, help="round-robin repeats (>= 3 advised)")
    p.add_argument("--prefill", type=int, default=2048, help="prompt length; 0 skips prefill")
    p.add_argument("--mode", default="reduce-overhead", help='compile mode; "none" for default')
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--inductor-options", type=json.loads, default=None, metavar="JSON",
                   help='Inductor options on top of the mode\'s, for every variant, e.g. '
                   '\'{"coordinate_descent_tuning": false}\'')
    p.add_argument("--guard-filter", metavar="NAME",
                   help="a torch.compiler guard filter for every variant, e.g. "
                   "skip_guard_on_all_nn_modules_unsafe, or 'fxfuse' for fxfuse.guard_filter: Dynamo "
                   "checks its guards on every parameter per call, on host time (more for torchao's "
                   "tensor subclasses)")
    p.add_argument("--tol", type=float, default=5e-2,
                   help="largest |out-ref|/|ref| of logits that counts as agreeing with eager")
    p.add_argument("--tiny", action="store_true", help="tiny config; CPU allowed")
    p.add_argument("--int8", action="store_true",
                   help="weight-only int8 linears (gpt-fast style: linear(x, w.to(dtype)) * scales); "
                   "the hand-fused model is quantized after fusing")
    p.add_argument("--torchao", metavar="CONFIGS",
                   help="comma-separated torchao configs (int8wo, int8dq, float8wo, float8dq_row, "
                   "float8dq_tensor, int4 (CUDA tinygemm), int4_cpu), each run in turn; variants default to "
                   + TORCHAO_VARIANTS)
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile one generation per variant: GPU kernel time "
                   "and kernel count per token, and the largest kernels")
    p.add_argument("--out", type=Path, help="directory for results.json and results.md")
    return p.parse_args(argv)


@dataclass
class Variant:
    name: str
    model: Transformer  # whose weights and KV cache this variant runs on
    fn: object = None
    error: str | None = None
    res: dict = field(default_factory=dict)
    tps: list = field(default_factory=list)
    host_s: list = field(default_factory=list)
    prefill_ms: list = field(default_factory=list)


class Bench:
    def __init__(self, args, dev, mode, cfg):
        self.args, self.dev, self.mode, self.cfg = args, dev, mode, cfg
        self.cuda = dev.type == "cuda"
        self.P, self.N = args.prefill, args.tokens
        # One tensor per position, made once: no host->device copy inside timed loops.
        self.pos = [torch.tensor([p], device=dev) for p in range(self.P + self.N)]
        g = torch.Generator(device=dev).manual_seed(123)
        self.first_tok = torch.randint(0, cfg.vocab, (1, 1), device=dev, generator=g)
        self.prompt = torch.randint(0, cfg.vocab, (1, max(self.P, 1)), device=dev, generator=g)
        self.t0 = time.perf_counter()

    def log(self, msg):
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", flush=True)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def mark(self):
        # reduce-overhead: each call is a new step, so CUDA graph trees may reuse
        # the previous call's output memory (we copy out what we keep first).
        if self.cuda and self.mode:
            torch.compiler.cudagraph_mark_step_begin()

    def mem(self):
        if not self.cuda:
            return None
        gc.collect()
        self.sync()
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated(), torch.cuda.memory_reserved()

    def fill_cache(self, model, seed):
        """Random cache contents (never zeros), the same for every model of one config."""
        g = torch.Generator(device=self.dev).manual_seed(seed)
        for layer in model.layers:
            layer.attention.k_cache.normal_(generator=g)
            layer.attention.v_cache.normal_(generator=g)

    def check_step(self, fn, model, seed):
        """One decode step at position P on a seeded random cache and token."""
        self.fill_cache(model, seed)
        g = torch.Generator(device=self.dev).manual_seed(seed)
        tok = torch.randint(0, self.cfg.vocab, (1, 1), device=self.dev, generator=g)
        self.mark()
        return fn(tok, self.pos[self.P]).float()  # .float() copies out of the graph pool

    def generate(self, fn, host=None):
        """Greedy decode of N tokens; returns seconds. No host sync inside the loop.
        `host` gets the seconds the host took to enqueue the N steps: when that is
        close to the total, the host, not the GPU, sets the pace."""
        tok = self.first_tok
        self.sync()
        t = time.perf_counter()
        for i in range(self.N):
            self.mark()
            tok = fn(tok, self.pos[self.P + i])[:, -1].argmax(-1, keepdim=True)
        if host is not None:
            host.append(time.perf_counter() - t)
        self.sync()
        return time.perf_counter() - t

    def kernels(self, fn, top=6):
        """GPU kernel time per token over one generation (torch.profiler,
        CUDA graph replays included): total, count, and the largest kernels."""
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            self.generate(fn)
        per = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0:
                n, us = per.get(e.name, (0, 0.0))
                per[e.name] = (n + 1, us + e.device_time_total)
        total = sum(us for _, us in per.values())
        rows = sorted(per.items(), key=lambda kv: -kv[1][1])[:top]
        return {"gpu_us_per_token": total / self.N,
                "kernels_per_token": sum(n for n, _ in per.values()) / self.N,
                "top": [{"name": k[:90], "per_token": n / self.N, "us_per_token": us / self.N}
                        for k, (n, us) in rows]}

    def prefill(self, fn, iters=3):
        self.sync()
        t = time.perf_counter()
        for _ in range(iters):
            self.mark()
            fn(self.prompt)
        self.sync()
        return (time.perf_counter() - t) / iters

    def compile(self, v, make):
        """Compile decode (and prefill) under the variant's config, timing the first calls."""
        before = self.mem()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        graphs0 = counters["stats"]["unique_graphs"]
        skips0 = counters["inductor"]["cudagraph_skips"]
        fx0 = {k: dict(counters[k]) for k in ("fxfuse", "fxfuse_skipped")}
        # freezing: the scoped patch covers the compile and every call that may compile.
        frozen = v.name == "freezing"
        with torch._inductor.config.patch(freezing=True) if frozen else contextlib.nullcontext():
            v.fn = make()
            # 3 calls: CUDA graph trees compile+warm up on the 1st, record on the 2nd,
            # replay from the 3rd; the compile time includes all of it.
            t = time.perf_counter()
            for _ in range(3):
                self.mark()
                v.fn(self.first_tok, self.pos[self.P])
            self.sync()
            v.res["compile_decode_s"] = time.perf_counter() - t
            if self.P:
                v.res["compile_prefill_s"] = self.prefill(v.fn, iters=3) * 3
        after = self.mem()
        v.res["graphs_compiled"] = counters["stats"]["unique_graphs"] - graphs0
        v.res["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips0
        for k, old in fx0.items():  # what the fxfuse pass did in this variant's graphs
            if delta := {n: c - old.get(n, 0) for n, c in counters[k].items() if c != old.get(n, 0)}:
                v.res[k] = delta
        if before:
            peak = torch.cuda.max_memory_allocated()
            v.res.update(extra_alloc_gib=(after[0] - before[0]) / GiB,
                         extra_reserved_gib=(after[1] - before[1]) / GiB,
                         peak_gib=peak / GiB, peak_over_before_gib=(peak - before[0]) / GiB)


def compare(out, ref, tol):
    err = (out - ref).norm() / ref.norm()
    return {"max_abs": (out - ref).abs().max().item(), "rel": err.item(),
            "argmax_match": (out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "agrees": bool(torch.isfinite(out).all() and err <= tol)}


def own_code(model, name):
    """`model` called through a forward of its own code object. Dynamo keeps
    compiled code per code object: with the guards on modules filtered out,
    variants entered through one Transformer.forward would run each other's
    graphs."""
    ns: dict = {}
    exec("def forward(self, *args):\n    return self.model(*args)\n", {}, ns)  # a new code object
    run = type(f"Run_{name}", (torch.nn.Module,), {"forward": ns["forward"]})()
    run.model = model
    return run


def make_compiled(v, mode, extra=None, guard_filter=None):
    """`extra`: Inductor options on top of the mode's (then every variant
    passes the mode as options, since torch.compile takes one or the other).
    `guard_filter`: the name of a torch.compiler guard filter, for every variant."""
    name, model = v.name, v.model
    mode_opts = torch._inductor.list_mode_options(mode) if mode else {}
    opts = {**mode_opts, **extra} if extra else None
    inner = {"inner_options": opts} if opts else {"mode": mode}  # for fxfuse.backend()
    if guard_filter:  # torch.compile takes the filter among its options, then no mode
        import fxfuse  # "fxfuse": fxfuse.guard_filter, which leaves out only the guards fxfuse checks itself
        gf = {"guard_filter_fn": fxfuse.guard_filter if guard_filter == "fxfuse" else getattr(torch.compiler, guard_filter)}
        run = own_code(model, name)
        if name in ("fxfuse", "fxfuse_cat"):
            v.res["fxfuse_via"] = "fxfuse.backend()"
            weights = {"weights": "cat"} if name == "fxfuse_cat" else {}
            return torch.compile(run, backend=fxfuse.backend(**inner, **weights), options=gf, dynamic=False)
        frozen = {"freezing": True} if name == "freezing" else {}
        return torch.compile(run, options={**(opts or mode_opts), **frozen, **gf}, dynamic=False)
    if name == "fxfuse" and not opts:  # the string form takes no options for the inner compiler
        try:
            v.res["fxfuse_via"] = 'backend="fxfuse" (entry point)'
            return torch.compile(model, backend="fxfuse", mode=mode, dynamic=False)
        except Exception as e:  # no entry point: the package is not pip-installed here
            v.res["fxfuse_via"] = f"fxfuse.backend() (no entry point: {e!r})"
    if name in ("fxfuse", "fxfuse_cat"):
        import fxfuse  # the same backend, built by the package's own call
        v.res.setdefault("fxfuse_via", "fxfuse.backend()" + (" (inner options)" if opts else ""))
        weights = {"weights": "cat"} if name == "fxfuse_cat" else {}
        return torch.compile(model, backend=fxfuse.backend(**inner, **weights), dynamic=False)
    if name == "freezing":
        # Same model and same mode as `unfused` would compare equal as backends, and
        # dynamo would reuse unfused's compiled code without compiling (seen on torch
        # 2.13). Spelling the mode as options plus freezing=True makes it distinct.
        return torch.compile(model, options={**(opts or mode_opts), "freezing": True}, dynamic=False)
    return torch.compile(model, dynamic=False, **({"options": opts} if opts else {"mode": mode}))


def model_bytes(cfg, model):
    """Bytes one decode step must read: weights (not the embedding table, one row
    of it is read) plus the whole KV cache (attention masks, it does not skip)."""
    tensors = [(n, p) for n, p in model.named_parameters() if not hasattr(p, "__tensor_flatten__")]
    tensors += quantized_inner(model)  # torchao weights: their packed data and scales
    tensors += [(n, b) for n, b in model.named_buffers() if n.endswith(("weight", "scales"))]  # int8 linears
    w = sum(p.numel() * p.element_size() for n, p in tensors if not n.startswith("tok_embeddings"))
    kv = 2 * cfg.n_layer * cfg.n_kv_head * cfg.max_seq * cfg.head_dim * 2
    return w, w + kv


def copy_bandwidth(dev):
    """Device-to-device copy rate (bytes read + written), the decode ceiling (METHOD.md)."""
    x = torch.randn(2**28, device=dev)  # 1 GiB
    y = torch.empty_like(x)
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(13)]
    for a, b in ev:
        a.record(); y.copy_(x); b.record()  # noqa: E702
    torch.cuda.synchronize()
    return 2 * x.nbytes / (statistics.median(a.elapsed_time(b) for a, b in ev[3:]) / 1e3)


def summarize(vs, meta):
    base = next((v for v in vs if v.name == "unfused" and v.tps), None)
    for v in vs:
        r = v.res
        if v.tps:
            med = statistics.median(v.tps)
            r["host_ms_per_token"] = statistics.median(v.host_s) * 1e3 / meta["tokens"]
            r.update(decode_tok_s=med, decode_tok_s_all=v.tps,
                     decode_spread=(max(v.tps) - min(v.tps)) / med,
                     decode_gb_s=med * meta["bytes_per_token"] / 1e9)
            if base:
                r["decode_speedup"] = med / statistics.median(base.tps)
        if v.prefill_ms:
            med = statistics.median(v.prefill_ms)
            r.update(prefill_ms=med, prefill_ms_all=v.prefill_ms,
                     prefill_spread=(max(v.prefill_ms) - min(v.prefill_ms)) / med,
                     prefill_tflop_s=meta["prefill_flop"] / med / 1e9)
            if base and base.prefill_ms:
                r["prefill_speedup"] = statistics.median(base.prefill_ms) / med
        if v.error:
            r["error"] = v.error


def markdown(vs, meta):
    f = lambda x, s="{:.2f}": "-" if x is None else s.format(x)  # noqa: E731
    bw = meta.get("copy_bw_gb_s")
    lines = [f"card: {meta['card']}  torch: {meta['torch']}  mode: {meta['mode']}"
             f"  options: {meta.get('inductor_options')}  guard filter: {meta.get('guard_filter')}",
             f"command: {meta['command']}",
             f"config: {meta['config']}",
             f"decode reads {meta['bytes_per_token'] / 1e9:.2f} GB/token; copy bandwidth "
             f"{f(bw, '{:.0f}')} GB/s -> floor {f(bw and bw * 1e9 / meta['bytes_per_token'], '{:.1f}')} tok/s",
             "speedup = unfused time / variant time (>1 is faster); spread = (max-min)/median "
             "over repeats: speedups inside the spread are noise. Variants compiled in the order "
             "listed, in one process: later ones may reuse kernels compiled for earlier ones.",
             *([f"torchao {meta['torchao']} ({meta['quantized_weight_class']}): quantized weights "
                f"{meta['quantized_bytes_before'] / GiB:.3f} GiB before, "
                f"{meta.get('quantized_bytes_after', 0) / GiB:.3f} GiB after (distinct storages)"]
               if "torchao" in meta else []),
             *(f"WARNING: {w}" for w in meta.get("warnings", [])), "",
             "| variant | decode tok/s | speedup | GB/s | spread | prefill ms | speedup | TFLOP/s "
             "| extra GiB alloc/reserved | peak GiB | compile s dec/pre | rel err vs eager "
             "| agrees after in-place scale |", "|" + "---|" * 13]
    for v in vs:
        r = v.res
        if v.error:
            lines.append(f"| {v.name} | error: {v.error.splitlines()[0][:200]} |" + " |" * 11)
            continue
        ip = r.get("inplace", {})
        lines.append(
            f"| {v.name} | {f(r.get('decode_tok_s'), '{:.1f}')} | {f(r.get('decode_speedup'), '{:.3f}')} "
            f"| {f(r.get('decode_gb_s'), '{:.0f}')} | {f(r.get('decode_spread'), '{:.1%}')} "
            f"| {f(r.get('prefill_ms'))} | {f(r.get('prefill_speedup'), '{:.3f}')} "
            f"| {f(r.get('prefill_tflop_s'), '{:.0f}')} "
            f"| {f(r.get('extra_alloc_gib'))}/{f(r.get('extra_reserved_gib'))} | {f(r.get('peak_gib'))} "
            f"| {f(r.get('compile_decode_s'), '{:.1f}')}/{f(r.get('compile_prefill_s'), '{:.1f}')} "
            f"| {f(r.get('check', {}).get('rel'), '{:.1e}')} "
            f"| {ip.get('agrees', '-')} (rel {f(ip.get('rel'), '{:.1e}')}) |")
    lines += ["", "| variant | ms/token | host ms/token | GPU kernel ms/token | kernels/token |",
              "|---|---|---|---|---|"]
    for v in vs:
        r, pr = v.res, v.res.get("profile", {})
        if r.get("decode_tok_s"):
            lines.append(f"| {v.name} | {1e3 / r['decode_tok_s']:.3f} | {r['host_ms_per_token']:.3f} "
                         f"| {f(pr.get('gpu_us_per_token') and pr['gpu_us_per_token'] / 1e3, '{:.3f}')} "
                         f"| {f(pr.get('kernels_per_token'), '{:.1f}')} |")
    for v in vs:
        for k in v.res.get("profile", {}).get("top", []):
            lines.append(f"{v.name}: {k['us_per_token']:8.1f} us/token {k['per_token']:5.1f}x  {k['name']}")
    lines += [f"\n{v.name}: {v.res.get('fxfuse_via')}; pass counters {v.res.get('fxfuse')}"
              for v in vs if "fxfuse_via" in v.res and not v.error]
    return "\n".join(lines) + "\n"


def save(out, vs, meta, md=None):
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "variants": {v.name: v.res for v in vs}}
    (out / "results.json").write_text(json.dumps(data, indent=1, default=str))
    if md:
        (out / "results.md").write_text(md)


def run(args):
    names = list(dict.fromkeys(n.strip() for n in args.variants.split(",") if n.strip()))
    if bad := [n for n in names if n not in VARIANTS]:
        sys.exit(f"unknown variants {bad}; choose from {VARIANTS}")
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        sys.exit("no CUDA device: use --tiny for a CPU smoke test")
    dev = torch.device("cuda" if cuda else "cpu")
    mode = args.mode if cuda and args.mode.lower() not in ("none", "default") else None
    max_seq = -(-(args.prefill + args.tokens) // 256) * 256  # 2048+128 -> 2304, the 7B default
    cfg = (LlamaConfig(n_layer=args.layers or 2, max_seq=max_seq) if args.tiny
           else LlamaConfig.llama2_7b(n_layer=args.layers or 32, max_seq=max_seq))
    b = Bench(args, dev, mode, cfg)
    meta = {"card": torch.cuda.get_device_name() if cuda else "cpu",
            "torch": f"{torch.__version__} (CUDA {torch.version.cuda})",
            "mode": mode, "command": " ".join([sys.executable] + sys.argv), "config": repr(cfg),
            "variants_order": names, "tokens": args.tokens, "inductor_options": args.inductor_options,
            "guard_filter": args.guard_filter}
    if cuda:
        meta["copy_bw_gb_s"] = copy_bandwidth(dev) / 1e9
    b.log(f"{meta['card']}, torch {meta['torch']}, {cfg}")

    def warn(msg):
        meta.setdefault("warnings", []).append(msg)
        b.log("WARNING " + msg)

    torch.manual_seed(0)
    # bf16 as the default while building: no fp32 copy of 7B weights (27 GB) on the
    # card; the rope tables are built explicitly in fp32 and stay so.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            plain = Transformer(cfg).eval()
            fused = (load_hand_fused(Transformer(cfg, hand_fused=True), plain).eval()
                     if "hand_fused" in names else None)
            if args.int8:
                plain = quantize_int8(plain)
                fused = quantize_int8(fused) if fused is not None else None
            if args.torchao:
                from torchao.quantization import quantize_

                for m in (plain, fused):
                    if m is not None:
                        quantize_(m, torchao_config(args.torchao))
                meta["torchao"] = args.torchao
                meta["quantized_weight_class"] = type(plain.layers[0].attention.wq.weight).__name__
    finally:
        torch.set_default_dtype(old)
    models = [m for m in (plain, fused) if m is not None]
    for m in models:
        m.setup_cache(1)  # caches exist before any "before" reading: not counted as extra
    if args.torchao:
        meta["quantized_bytes_before"] = sum(t.nbytes for _, t in quantized_inner(plain))
    w, meta["bytes_per_token"] = model_bytes(cfg, plain)
    meta["weight_bytes"] = w
    # 2 flop per weight per token, plus causal attention (QK^T and PV, half of P x P).
    meta["prefill_flop"] = 2 * args.prefill * (w // 2) + 2 * cfg.n_layer * cfg.dim * args.prefill**2
    b.log(f"models built; decode reads {meta['bytes_per_token'] / 1e9:.2f} GB/token")

    ref = b.check_step(plain, plain, seed=1)
    ref_pre = plain(b.prompt).float() if args.prefill else None
    vs = [Variant(n, fused if n == "hand_fused" else plain) for n in names]
    for v in vs:
        try:
            b.log(f"compiling {v.name}")
            b.compile(v, lambda v=v: make_compiled(v, mode, args.inductor_options, args.guard_filter))
            v.res["check"] = compare(b.check_step(v.fn, v.model, seed=1), ref, args.tol)
            if args.prefill:
                b.mark()
                v.res["prefill_check"] = compare(v.fn(b.prompt).float(), ref_pre, args.tol)
            b.generate(v.fn)  # untimed warm-up of the whole decode loop
            b.log(f"{v.name}: {v.res}")
            if v.res["graphs_compiled"] == 0:
                warn(f"{v.name} compiled no graph: it reuses another variant's code")
            if mode and v.res["cudagraph_skips"]:
                warn(f"{v.name}: inductor skipped CUDA graphs ({v.res['cudagraph_skips']}x): "
                     "run with TORCH_LOGS=perf_hints to see why")
        except Exception as e:
            traceback.print_exc()
            v.error = f"{type(e).__name__}: {e}"
        save(args.out, vs, meta)

    ok = [v for v in vs if not v.error]
    graphs0 = counters["stats"]["unique_graphs"]
    for r in range(args.repeats):  # round robin: drift (clocks, heat) hits every variant alike
        for v in ok:
            v.tps.append(args.tokens / b.generate(v.fn, v.host_s))
        for v in ok if args.prefill else ():
            v.prefill_ms.append(b.prefill(v.fn) * 1e3)
        b.log(f"repeat {r}: " + ", ".join(f"{v.name} {v.tps[-1]:.1f} tok/s" for v in ok))
        summarize(vs, meta)
        save(args.out, vs, meta)  # partial results survive a run cut off at its time limit
    if counters["stats"]["unique_graphs"] != graphs0:
        warn("something recompiled while being timed: timings include compiles")
    for v in ok if args.profile and b.cuda else ():
        try:
            v.res["profile"] = b.kernels(v.fn)
        except Exception as e:
            v.res["profile"] = {"error": f"{type(e).__name__}: {e}"}

    # In-place check: scale every weight; a variant that copied or froze weights at
    # compile time keeps computing with the old ones and disagrees with eager.
    for m in models:
        for p in m.parameters():
            if hasattr(p, "__tensor_flatten__"):  # torchao: halve the scales in place
                # int4 (tinygemm) keeps scales and zeros together: halving both halves the weight.
                (p.scale if hasattr(p, "scale") else p.scale_and_zero).mul_(0.5)
            else:
                p.mul_(0.5)
        for name, buf in m.named_buffers():
            if name.endswith("scales"):  # int8 linears: scale the dequantized weights
                buf.mul_(0.5)
    ref2 = b.check_step(plain, plain, seed=2)
    for v in ok:
        try:
            v.res["inplace"] = compare(b.check_step(v.fn, v.model, seed=2), ref2, args.tol)
        except Exception as e:
            v.res["inplace"] = {"error": f"{type(e).__name__}: {e}"}

    if args.torchao:  # quantized bytes after: no variant may have added a copy
        meta["quantized_bytes_after"] = sum(
            {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for _, t in quantized_inner(plain)}.values())
    summarize(vs, meta)
    md = markdown(vs, meta)
    print("\n" + md, flush=True)
    save(args.out, vs, meta, md)
    return md


def main(argv=None):
    args = parse_args(argv)
    # 4 variants x (decode, prefill) compile entries share Transformer's code; the
    # default limit (8) is just reached, so raise it here, for this run only.
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    with torch._dynamo.config.patch(**{limit: 64}), torch.no_grad():
        if not args.torchao:
            return run(args)
        if args.variants == ",".join(VARIANTS):
            args.variants = TORCHAO_VARIANTS
        tables = []
        for name in args.torchao.split(","):  # one config at a time, each from a clean slate
            torch._dynamo.reset()
            one = argparse.Namespace(**{**vars(args), "torchao": name,
                                        "out": args.out / name if args.out else None})
            tables.append(f"## torchao {name}\n\n" + run(one))
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        print("\n" + "\n".join(tables), flush=True)


if __name__ == "__main__":
    main()
