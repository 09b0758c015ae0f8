"""Small SD3 and Flux transformers (diffusers' SD3Transformer2DModel and
FluxTransformer2DModel from configs: random weights, no download) through
the fxfuse backend, next to diffusers' own `fuse_qkv_projections()`.

    pip install diffusers
    python examples/diffusers_transformer.py          # tiny configs, CPU

In these models diffusers' hand fusion joins the q/k/v of the image stream
and the add_q/k/v of the text stream in each joint attention. fxfuse finds
those, and two more kinds of siblings:

- the AdaLN modulation linears: every block's norm1, norm1_context (Flux's
  single blocks: norm) and norm_out apply silu(temb) through their own
  linear. Each computes its own silu, so fxfuse matches the duplicated
  producers and runs every AdaLN linear of the model as one GEMM on temb
  (docs/design.md, "Duplicated producers");
- in Flux's single blocks, proj_mlp reads the same normed input as to_q,
  to_k and to_v: one GEMM of four.

Full-size timings: benchmarks/diffusers_step.py --model sd3 / flux.
"""

from __future__ import annotations

import argparse
import copy

import torch

import fxfuse


def build(kind: str = "sd3", device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, keyword inputs of one denoising step)."""
    import diffusers

    torch.manual_seed(0)
    if kind == "sd3":
        model = diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32, out_channels=4,
            pos_embed_max_size=16)
        kwargs = dict(hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 8, 32),
                      pooled_projections=torch.randn(2, 32), timestep=torch.tensor([500.0, 500.0]))
    elif kind == "flux":
        model = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))
        kwargs = dict(hidden_states=torch.randn(1, 16, 4), encoder_hidden_states=torch.randn(1, 8, 32),
                      pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]),
                      guidance=torch.tensor([3.5]), img_ids=torch.randn(16, 3), txt_ids=torch.zeros(8, 3))
    else:
        raise ValueError(f"kind must be 'sd3' or 'flux', got {kind!r}")
    model = model.to(device, dtype).eval()
    return model, {**{k: v.to(device, dtype) for k, v in kwargs.items()}, "return_dict": False}


def linear_calls(model, kwargs) -> int:
    """Linear calls in the graph Dynamo captures of one step."""
    from fxfuse.match import count_linears

    counts = []

    def count(gm, example_inputs):
        counts.append(count_linears(gm))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=count)(**kwargs)
    torch._dynamo.reset()
    return sum(counts)


def compare(model, kwargs, inner: str = "eager"):
    """(fxfuse report, linear calls per step after diffusers' fusion); both
    outputs checked against eager. `report.before` counts the unfused calls."""
    with torch.no_grad():
        ref = model(**kwargs)[0]
        fused = copy.deepcopy(model)  # before fxfuse moves the weights
        fused.fuse_qkv_projections()
        torch.testing.assert_close(fused(**kwargs)[0], ref)
        be = fxfuse.backend(inner=inner)
        out = torch.compile(model, backend=be, fullgraph=True)(**kwargs)[0]
        torch.testing.assert_close(out, ref)
    return be.report, linear_calls(fused, kwargs)


def main():
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    for kind in ("sd3", "flux"):
        model, kwargs = build(kind)
        report, after = compare(model, kwargs)
        print(f"{type(model).__name__} (tiny)\n{report}")
        print(f"\nlinear calls per step: {report.before} unfused, {report.after} with fxfuse, "
              f"{after} with fuse_qkv_projections()\n")
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
