"""Real pipelines on the CPU with tiny configs (random weights, no downloads):
diffusion transformers, and the examples in examples/."""

from __future__ import annotations

import pytest
import torch

import fxfuse

diffusers = pytest.importorskip("diffusers")


def compile_and_compare(model, kwargs):
    be = fxfuse.backend(inner="eager")
    with torch.no_grad():
        ref = model(**kwargs)[0]
        out = torch.compile(model, backend=be, fullgraph=True)(**kwargs)[0]
    torch.testing.assert_close(out, ref)
    return be.report


def adaln_group(report, names):
    """The fused group holding every AdaLN linear on temb (and no other).
    Members are matched by the end of their module path (how Dynamo spells
    the root differs between torch versions)."""
    def named(g, n):
        return any(m == n or m.endswith("." + n) or m.endswith("]." + n.split(".", 1)[1]) for m in g.members)

    groups = [g for g in report.groups if any(named(g, n) for n in names)]
    assert len(groups) == 1, report
    assert len(groups[0].members) == len(names) and all(named(groups[0], n) for n in names), groups[0].members
    return groups[0]


def test_flux_adaln_linears_fuse_on_temb():
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
    ).eval()
    kwargs = dict(hidden_states=torch.randn(1, 16, 4), encoder_hidden_states=torch.randn(1, 8, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]),
                  img_ids=torch.randn(16, 3), txt_ids=torch.randn(8, 3), return_dict=False)
    report = compile_and_compare(model, kwargs)
    # Each AdaLN reads its own silu(temb): 2 double blocks x (norm1, norm1_context),
    # 2 single blocks, norm_out (silu(temb).to(dtype)): one GEMM on temb.
    names = [f"transformer_blocks.{i}.{n}.linear" for i in range(2) for n in ("norm1", "norm1_context")]
    names += [f"single_transformer_blocks.{i}.norm.linear" for i in range(2)] + ["norm_out.linear"]
    group = adaln_group(report, names)
    assert group.widths == (6 * 32,) * 4 + (3 * 32,) * 2 + (2 * 32,)


def test_sd3_adaln_linears_fuse_on_temb():
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=16,
    ).eval()
    kwargs = dict(hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 8, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([3]), return_dict=False)
    report = compile_and_compare(model, kwargs)
    # The last block's context norm is AdaLayerNormContinuous, like norm_out.
    names = ["transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear",
             "transformer_blocks.1.norm1.linear", "transformer_blocks.1.norm1_context.linear", "norm_out.linear"]
    group = adaln_group(report, names)
    assert group.widths == (6 * 32,) * 3 + (2 * 32,) * 2
