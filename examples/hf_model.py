"""A Hugging Face transformers model built from a config (random weights, no
download) through the fxfuse backend, with its report.

    pip install transformers
    python examples/hf_model.py
    python -m fxfuse inspect examples/hf_model.py:build
"""

import torch

import fxfuse


def build():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    return model, (torch.randint(0, 256, (1, 12)),)


def main():
    model, (tokens,) = build()
    be = fxfuse.backend(inner="eager")
    with torch.no_grad():
        ref = model(tokens).logits
        out = torch.compile(model, backend=be)(tokens).logits
    torch.testing.assert_close(out, ref)
    print(be.report)


if __name__ == "__main__":
    main()
