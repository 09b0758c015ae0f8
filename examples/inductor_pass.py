"""Keep ``backend="inductor"`` and add fxfuse to Inductor's custom passes.

    python examples/inductor_pass.py
"""

import torch

import fxfuse
from fxfuse.models import LlamaConfig, Transformer


def build():
    torch.manual_seed(0)
    model = Transformer(LlamaConfig(n_layer=2, q_bias=True)).eval()
    return model, (torch.randint(0, 128, (2, 8)),)


def main():
    model, (tokens,) = build()
    # Appended after any pass already in the hook, for this block only.
    with fxfuse.installed("post_grad_custom_pre_pass") as fuse_pass, torch.no_grad():
        compiled = torch.compile(model)
        torch.testing.assert_close(compiled(tokens), model(tokens))
    print(fuse_pass.report)


if __name__ == "__main__":
    main()
