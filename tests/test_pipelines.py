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


# ---------------------------------------------------------------- the examples

def _example(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hf_generate_static_cache_compiled_forward():
    pytest.importorskip("transformers")
    ex = _example("hf_generate")
    model, (prompt,) = ex.build()
    with torch.no_grad():
        ref = model.generate(prompt, **ex.GENERATE, disable_compile=True)
    tokens, report = ex.generate_compiled_forward(model, prompt)
    assert torch.equal(tokens, ref)
    # prefill and one decode step: q/k/v and gate/up fused in each layer of both graphs
    assert report.graphs == 2 and report.removed == 2 * 2 * 3


def test_hf_generate_compile_config_skipped_on_cpu():
    # transformers compiles generate()'s decode steps on accelerators only: on the
    # CPU the backend is never called, and the tokens are eager's.
    pytest.importorskip("transformers")
    ex = _example("hf_generate")
    model, (prompt,) = ex.build()
    with torch.no_grad():
        ref = model.generate(prompt, **ex.GENERATE, disable_compile=True)
    tokens, report = ex.generate_compile_config(model, prompt)
    assert torch.equal(tokens, ref) and report.graphs == 0


def test_diffusers_unet_against_fuse_qkv_projections():
    ex = _example("diffusers_unet")
    unet, inputs = ex.build()
    report, after = ex.compare(unet, inputs)  # both checked against eager inside
    assert report.before == 50
    # diffusers fuses self-attention q/k/v and cross-attention k/v per block (12 calls
    # removed); fxfuse also joins the cross-attention k/v of every block on the text
    # embeddings, and the resnets' time projections on their duplicated silu(temb).
    assert after == 38 and report.after == 28
    temb = [g for g in report.groups if all(m.endswith("time_emb_proj") for m in g.members)]
    assert len(temb) == 1 and len(temb[0].members) == 8


def test_peft_lora_unmerged_adapters_join_qkv():
    pytest.importorskip("peft")
    ex = _example("peft_lora")
    model, (tokens,) = ex.build(r=4)
    be = fxfuse.backend(inner="eager")
    with torch.no_grad():
        ref = model(tokens).logits
        out = torch.compile(model, backend=be)(tokens).logits
    torch.testing.assert_close(out, ref)
    attn = [g for g in be.report.groups if any("lora_A" in m for m in g.members)]
    assert len(attn) == 2  # one per layer
    for g in attn:
        assert sorted(m.rsplit("self_attn.", 1)[1] for m in g.members) == [
            "k_proj", "q_proj.base_layer", "q_proj.lora_A.default", "v_proj.base_layer", "v_proj.lora_A.default"]
        assert sorted(g.widths) == [4, 4, 32, 32, 64]


@pytest.mark.parametrize("kind, before, after, diffusers_after", [("sd3", 32, 20, 24), ("flux", 50, 30, 38)])
def test_diffusers_transformer_against_fuse_qkv_projections(kind, before, after, diffusers_after):
    ex = _example("diffusers_transformer")
    model, kwargs = ex.build(kind)
    report, fused_after = ex.compare(model, kwargs)  # both checked against eager inside
    # diffusers removes 2 calls per q/k/v and add_q/k/v set in each of the 2 joint
    # blocks (8), and Flux's single blocks' q/k/v (2 x 2). fxfuse removes the same
    # and joins every AdaLN linear on temb (SD3: 5 in one GEMM, Flux: 7) and, in
    # Flux's single blocks, proj_mlp with q/k/v.
    assert (report.before, report.after, fused_after) == (before, after, diffusers_after)
    if kind == "flux":
        single = [g for g in report.groups if any(m.endswith("proj_mlp") for m in g.members)]
        assert len(single) == 2
        for g in single:
            assert sorted(m.rsplit("single_transformer_blocks.", 1)[1][2:] for m in g.members) == [
                "attn.to_k", "attn.to_q", "attn.to_v", "proj_mlp"]
            assert sorted(g.widths) == [32, 32, 32, 128]
