"""Hugging Face `generate()` with a static cache, through the fxfuse backend
(a LLaMA built from a config: random weights, no download).

    pip install transformers
    python examples/hf_generate.py

Two ways to compile what `generate()` runs (transformers 5.x):

  model.forward = torch.compile(model.forward, backend=be)
      Works on every device. Prefill and each decode step are compiled
      (two graphs: the prompt's length and one token).

  model.generate(..., compile_config=CompileConfig(backend=be))
      transformers compiles only the decode steps (prefill stays eager, so a
      new prompt length does not recompile), and only where
      `_valid_auto_compile_criteria` allows: a compileable cache (static) on
      cuda, xpu, neuron or tpu. On the CPU it logs "unable to meet the
      criteria for compilation" and runs uncompiled. CompileConfig's mode
      ("reduce-overhead" by default) is handed to fxfuse, which passes it to
      Inductor; the backend object survives CompileConfig's deep copy (it
      copies to itself), so `be.report` fills in.

Both are checked here against eager greedy decoding (the same tokens).
"""

from __future__ import annotations

import torch

import fxfuse


def build():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    return model, (torch.randint(0, 256, (1, 8)),)


GENERATE = dict(max_new_tokens=8, do_sample=False, cache_implementation="static")


def generate_compiled_forward(model, prompt, inner: str = "eager"):
    """`model.forward = torch.compile(...)`: prefill and decode compiled."""
    be = fxfuse.backend(inner=inner)
    eager_forward = model.forward
    model.forward = torch.compile(model.forward, backend=be)
    try:
        with torch.no_grad():
            tokens = model.generate(prompt, **GENERATE)
    finally:
        model.forward = eager_forward
    return tokens, be.report


def generate_compile_config(model, prompt, inner: str = "inductor"):
    """`generate(compile_config=CompileConfig(backend=...))`: decode steps
    compiled, on accelerators only (see the module docstring)."""
    from transformers import CompileConfig

    be = fxfuse.backend(inner=inner)
    with torch.no_grad():
        tokens = model.generate(prompt, **GENERATE, compile_config=CompileConfig(backend=be))
    return tokens, be.report


def main():
    model, (prompt,) = build()
    if torch.cuda.is_available():
        model, prompt = model.cuda(), prompt.cuda()
    with torch.no_grad():
        ref = model.generate(prompt, **GENERATE, disable_compile=True)
    tokens, report = generate_compiled_forward(model, prompt)
    assert torch.equal(tokens, ref), (tokens, ref)
    print("model.forward = torch.compile(...):", report.summary())
    torch._dynamo.reset()
    tokens, report = generate_compile_config(model, prompt)
    assert torch.equal(tokens, ref), (tokens, ref)
    print("generate(compile_config=...):", report.summary() if report.graphs else
          "not compiled on this device (transformers compiles on accelerators only)")


if __name__ == "__main__":
    main()
