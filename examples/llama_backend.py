"""A LLaMA-style model through ``torch.compile(backend="fxfuse")``.

    python examples/llama_backend.py
    python -m fxfuse inspect examples/llama_backend.py:build --diff
"""

import torch

import fxfuse
from fxfuse.models import LlamaConfig, Transformer


def build():
    """The model and example inputs (the factory `python -m fxfuse inspect` calls)."""
    torch.manual_seed(0)
    model = Transformer(LlamaConfig(n_layer=2, dim=128, n_head=8, n_kv_head=2, hidden=352, vocab=256)).eval()
    tokens = torch.randint(0, 256, (1, 16))
    return model, (tokens,)


def main():
    model, (tokens,) = build()
    be = fxfuse.backend(inner="inductor")  # or simply backend="fxfuse"
    compiled = torch.compile(model, backend=be)
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens), model(tokens))
    print(be.report)


if __name__ == "__main__":
    main()
