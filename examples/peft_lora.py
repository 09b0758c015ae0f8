"""PEFT LoRA on q/v of a Hugging Face LLaMA (random weights, no download),
adapters left unmerged, through the fxfuse backend.

    pip install transformers peft
    python examples/peft_lora.py

An unmerged LoRA linear computes ``base(x) + B(A(dropout(x))) * scale``.
With lora_dropout=0 (nn.Identity), the adapters' A matrices read the
attention input x like q, k and v do, so one GEMM computes
[q, k, v, A_q, A_v] (widths n_q + n_k + n_v + 2r); the B matrices read
different inputs and stay apart. Adapters stay switchable: the weights are
read through one storage, not copied (docs/design.md).
"""

from __future__ import annotations

import torch

import fxfuse


def build(r: int = 4):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    # init_lora_weights=False: random B too, so the adapters change the output.
    lora = LoraConfig(r=r, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      init_lora_weights=False)
    model = get_peft_model(base, lora).eval()
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
