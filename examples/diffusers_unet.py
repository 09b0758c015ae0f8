"""A Stable-Diffusion-1.5-like U-Net (diffusers' UNet2DConditionModel from a
config: random weights, no download) through the fxfuse backend, next to
diffusers' own `fuse_qkv_projections()`.

    pip install diffusers
    python examples/diffusers_unet.py            # tiny config, CPU
    python examples/diffusers_unet.py --sd15     # SD 1.5 shapes (use a GPU)

fxfuse needs no change to the model: it fuses the self-attention q/k/v and
the cross-attention k/v (as diffusers' hand fusion does), and the resnets'
time-embedding projections, which each read their own silu(temb)
(docs/design.md, "Duplicated producers"). diffusers builds new fused weights
beside the old ones (+0.105 GiB for SD 1.5 in fp16); fxfuse moves
the weights into one storage. GPU timings: benchmarks/unet_step.py and
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy

import torch

import fxfuse


def build(sd15: bool = False, device: str = "cpu", dtype: torch.dtype = torch.float32):
    from diffusers import UNet2DConditionModel

    if sd15:
        config = dict(sample_size=64, cross_attention_dim=768)
        latents, text = (2, 4, 64, 64), (2, 77, 768)
    else:
        config = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                      norm_num_groups=8, attention_head_dim=4,
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        latents, text = (2, 4, 8, 8), (2, 7, 32)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to(device, dtype).eval()
    inputs = (torch.randn(latents, device=device, dtype=dtype), torch.tensor(500, device=device),
              torch.randn(text, device=device, dtype=dtype))
    return unet, inputs


def linear_calls(model, inputs) -> int:
    """Linear calls in the graph Dynamo captures of one step."""
    from fxfuse.match import count_linears

    counts = []

    def count(gm, example_inputs):
        counts.append(count_linears(gm))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=count)(*inputs)
    torch._dynamo.reset()
    return sum(counts)


def compare(unet, inputs, inner: str = "eager"):
    """(fxfuse report, linear calls per step after diffusers' fusion); both
    outputs checked against eager. `report.before` counts the unfused calls."""
    with torch.no_grad():
        ref = unet(*inputs).sample
        be = fxfuse.backend(inner=inner)
        out = torch.compile(unet, backend=be)(*inputs).sample
        torch.testing.assert_close(out, ref)
        fused = copy.deepcopy(unet)
        fused.fuse_qkv_projections()
        torch.testing.assert_close(fused(*inputs).sample, ref)
    return be.report, linear_calls(fused, inputs)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sd15", action="store_true")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    unet, inputs = build(args.sd15, "cuda" if cuda else "cpu", torch.float16 if cuda else torch.float32)
    report, after = compare(unet, inputs, inner="inductor" if cuda else "eager")
    print(report)
    print(f"\nlinear calls per step: {report.before} unfused, {report.after} with fxfuse, "
          f"{after} with fuse_qkv_projections()")


if __name__ == "__main__":
    main()
