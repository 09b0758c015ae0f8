#!/usr/bin/env python
"""Greedy decode speed of a Hugging Face LLaMA with PEFT LoRA adapters left
unmerged (LlamaForCausalLM from a LlamaConfig with LLaMA-2-7B shapes,
random weights, bf16, batch 1; LoRA r=16 on q_proj and v_proj, random A and
B), compiled two ways by `generate()` itself:

  inductor   generate(..., compile_config=CompileConfig())          Inductor
  fxfuse     generate(..., compile_config=CompileConfig(backend=fxfuse.backend()))

Both with a static cache and CompileConfig's default mode, "reduce-overhead"
(CUDA graphs): transformers compiles the decode step and runs the prefill
eagerly (docs/guide.md, "Hugging Face generate()"). Each variant has its own
copy of the model. Unmerged, each layer's q/k/v base layers and the lora_A
of q and v read the same input and fuse into one GEMM; gate/up into another.

    GPU:        python benchmarks/peft_decode.py
    CPU smoke:  python benchmarks/peft_decode.py --tiny --tokens 8 --repeats 2

Decode tokens/s: a logits processor stamps the time at every generated
token (after a device sync); the rate is over the decode steps only (the
first stamp follows the prefill). Variants are timed round-robin after one
untimed round; the table gives medians of --repeats. The variants' greedy
tokens are compared with each other and with eager's, and their per-step
logits with eager's over the steps where the tokens agree.
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

VARIANTS = ("inductor", "fxfuse")
GiB = 2**30


def build(tiny: bool, layers: int, rank: int, dev, dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    else:  # meta-llama/Llama-2-7b-hf's config.json
        config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                             rms_norm_eps=1e-5)
    torch.manual_seed(0)
    with dev:  # initialised where it runs: billions of random weights are slow to make on the host
        base = LlamaForCausalLM(config)
    # init_lora_weights=False: random B, so the adapters change the output.
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      init_lora_weights=False)
    # Cast after wrapping: PEFT would otherwise keep the adapters in float32
    # (autocast_adapter_dtype), and their input would be a cast of x, not x.
    return get_peft_model(base, lora).to(dev, dtype).eval()


class StepClock:
    """A logits processor that records the time of every generated token."""

    def __init__(self, sync):
        self.sync, self.stamps = sync, []

    def __call__(self, input_ids, scores):
        self.sync()
        self.stamps.append(time.perf_counter())
        return scores

    def decode_tok_s(self) -> float:
        return (len(self.stamps) - 1) / (self.stamps[-1] - self.stamps[0])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 16; tiny 2)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per generation")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--tiny", action="store_true", help="tiny config for a CPU smoke run")
    args = p.parse_args(argv)
    if args.layers is None:
        args.layers = 2 if args.tiny else 16
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    from transformers import CompileConfig, LogitsProcessorList

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    command = (f"python3 benchmarks/peft_decode.py --layers {args.layers} --rank {args.rank} --prompt {args.prompt} "
               f"--tokens {args.tokens} --repeats {args.repeats} --variants {','.join(variants)}"
               + (" --tiny" if args.tiny else ""))
    import peft
    import transformers

    card = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"card: {card}, torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"{dtype}\ncommand: {command}", flush=True)
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def mem():
        sync()
        return torch.cuda.memory_allocated() if cuda else 0

    plain = build(args.tiny, args.layers, args.rank, dev, dtype)
    vocab = plain.config.vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1)).to(dev)
    gen = dict(max_new_tokens=args.tokens, do_sample=False, cache_implementation="static",
               return_dict_in_generate=True, output_logits=True)
    log(f"built: {args.layers} layers, LoRA r={args.rank} on q_proj, v_proj (unmerged), "
        f"{mem() / GiB:.2f} GiB allocated")

    with torch.no_grad():
        ref = plain.generate(prompt, **gen, disable_compile=True)
    log(f"eager generate: {ref.sequences.shape[1] - args.prompt} tokens")

    # Copies made before anything is compiled (a copy would carry the
    # original's compiled call); "extra GiB" leaves the copy out.
    models = {name: plain if name == "inductor" else copy.deepcopy(plain) for name in variants}
    runs, info = {}, {}
    for name in variants:
        before = mem()
        model = models[name]
        be = fxfuse.backend() if name == "fxfuse" else None
        config = CompileConfig(backend=be) if be is not None else CompileConfig()
        if not cuda:
            config._compile_all_devices = True  # transformers compiles on accelerators only
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, **gen, compile_config=config)
            model.generate(prompt, **gen, compile_config=config)
        sync()
        compile_s = time.perf_counter() - start
        compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
        same = int((out.sequences == ref.sequences).all(0).long().cumprod(0).sum()) - args.prompt
        agree = min(same, len(out.logits))
        err = max(((a.float() - b.float()).norm() / b.float().norm()).item()
                  for a, b in zip(out.logits[:max(agree, 1)], ref.logits[:max(agree, 1)]))
        note = f"{compiled} graph(s) compiled"
        if be is not None:
            r = be.report
            note += (f"; {r.before} -> {r.after} linear calls, {len(r.groups)} groups; gate: "
                     f"{sum(d.fused for d in r.gate)} sets fused, {sum(not d.fused for d in r.gate)} left alone; "
                     f"skipped {dict(r.skipped)}")
            attn = [g for g in r.groups if any("lora_A" in m for m in g.members)]
            if attn:
                note += f"; e.g. {', '.join(m.rsplit('.self_attn.', 1)[-1] for m in attn[0].members)}"
        info[name] = dict(compile_s=compile_s, extra_gib=(mem() - before) / GiB, tokens=out.sequences,
                          same=same, err=err, calls=f"{be.report.before} -> {be.report.after}" if be else None)
        runs[name] = (model, config, [])
        log(f"{name}: compiled and generated twice in {compile_s:.1f}s, {same}/{args.tokens} tokens as eager, "
            f"max rel. logits error vs eager {err:.1e} (steps that agree), extra GiB {info[name]['extra_gib']:.2f}. "
            f"{note}")
        if compiled == 0:
            log(f"WARNING: {name}: nothing was compiled; its timings are eager's")
    if "inductor" in info and "fxfuse" in info:
        info["inductor"]["calls"] = info["fxfuse"]["calls"].split(" ->")[0]
        identical = torch.equal(info["inductor"]["tokens"], info["fxfuse"]["tokens"])
        log(f"greedy tokens of inductor and fxfuse identical: {identical}")

    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for rep in range(args.repeats + 1):  # the first round is a warm-up, not recorded
            for name, (model, config, rates) in runs.items():
                clock = StepClock(sync)
                model.generate(prompt, **{**gen, "output_logits": False}, compile_config=config,
                               logits_processor=LogitsProcessorList([clock]))
                if rep:
                    rates.append(clock.decode_tok_s())
    log("timed")
    if torch._dynamo.utils.counters["stats"]["unique_graphs"] != graphs:
        log("WARNING: something recompiled while being timed: timings include compiles")

    base = statistics.median(runs["inductor"][2]) if "inductor" in runs else None
    print(f"\n{command}\n")
    print("| variant | decode tok/s (median) | vs inductor | spread | extra GiB | tokens as eager | rel. logits err "
          "| linear calls | compile s | repeats (tok/s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (_, _, rates) in runs.items():
        med = statistics.median(rates)
        spread = (max(rates) - min(rates)) / med * 100
        i = info[name]
        print(f"| {name} | {med:.1f} | {f'{med / base:.3f}x' if base else '-'} | {spread:.1f}% | "
              f"{i['extra_gib']:.2f} | {i['same']}/{args.tokens} | {i['err']:.1e} | {i['calls'] or '-'} | "
              f"{i['compile_s']:.1f} | {', '.join(f'{r:.1f}' for r in rates)} |", flush=True)


if __name__ == "__main__":
    main()
