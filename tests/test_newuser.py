"""What a new user meets first: Hugging Face generate(), diffusers names and
report width, torch.ao dynamic int8, fuse_linears on a module."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

import fxfuse
from fxfuse.models import LlamaConfig, Transformer


def tiny_hf_llama():
    from transformers import LlamaConfig as HFLlamaConfig, LlamaForCausalLM

    cfg = HFLlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def test_hf_generate_compile_config_reports_to_the_users_backend():
    from transformers.generation import CompileConfig

    model, ids = tiny_hf_llama(), torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=3, do_sample=False, cache_implementation="static")
    ref = model.generate(ids, **kwargs)
    be = fxfuse.backend(inner="eager")
    config = CompileConfig(backend=be)  # its default mode, "reduce-overhead", reaches the backend
    config._compile_all_devices = True  # transformers compiles on GPUs only, unless told
    for _ in range(2):  # transformers deep-copies the config on each call
        torch.testing.assert_close(model.generate(ids, compile_config=config, **kwargs), ref)
    # The decode step compiled once, into the user's report: q/k/v and gate/up of 2 layers.
    assert (be.report.graphs, be.report.removed) == (1, 6)


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()


def test_diffusers_unet_names_are_dotted_and_the_report_fits_a_terminal(caplog):
    unet = tiny_unet()
    args = (torch.randn(1, 4, 8, 8), torch.tensor([10]))
    kwargs = {"encoder_hidden_states": torch.randn(1, 4, 32)}
    be = fxfuse.backend(inner="eager")
    caplog.set_level(logging.INFO, logger="fxfuse")
    with torch.no_grad():
        out = torch.compile(unet, backend=be)(*args, **kwargs).sample
        torch.testing.assert_close(out, unet(*args, **kwargs).sample)
    names = [m for g in be.report.groups for m in g.members]
    assert be.report.removed > 0 and all(n.startswith(("down_blocks.", "up_blocks.", "mid_block.")) for n in names)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in names  # as named_modules() has it
    assert max(map(len, str(be.report).splitlines())) <= 160
    assert tuple(be.report.as_dict()["groups"][0]["members"]) == be.report.groups[0].members  # in full
    lines = [r.getMessage() for r in caplog.records if r.name == "fxfuse"]
    assert lines and max(map(len, lines)) <= 320


def test_report_elides_a_long_member_list():
    members = tuple(f"layers.{i}.cross_attention.{p}" for i in range(32) for p in ("k_proj", "v_proj"))
    report = fxfuse.FuseReport(groups=[fxfuse.FusedGroup(members, (64,) * 64, (False,) * 64, "storage")])
    text = str(report)
    assert max(map(len, text.splitlines())) <= 160
    assert "layers.{0.cross_attention.k_proj, " in text and "+" in text and "more}" in text and "64x64" in text


def test_quantize_dynamic_runs_and_says_why_nothing_fused():
    model = Transformer(LlamaConfig(n_layer=1)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated
        quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    tokens = torch.randint(0, 128, (1, 4))
    be = fxfuse.backend(inner="eager")
    with torch.no_grad():
        ref = quantized(tokens)  # eager: the model reads no Linear attribute a quantizer replaces
        torch.testing.assert_close(torch.compile(quantized, backend=be)(tokens), ref)
    assert be.report.removed == 0
    assert be.report.skipped[fxfuse.Reason.AO_DYNAMIC_QUANT.value] >= 1


def test_fuse_linears_on_a_module_says_what_to_do():
    with pytest.raises(TypeError, match=r"got Linear: trace it first \(gm = torch.fx.symbolic_trace\(model\)\), "
                                        r"or compile it with torch.compile\(model, backend=\"fxfuse\"\)"):
        fxfuse.fuse_linears(torch.nn.Linear(4, 4))


def test_fuse_linears_takes_keyword_options():
    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x), self.b(x)

    pair, x = Pair(), torch.randn(2, 4)
    gm = torch.fx.symbolic_trace(pair)
    assert fxfuse.fuse_linears(gm, min_group_size=3).removed == 0
    assert fxfuse.fuse_linears(gm, min_group_size=2).removed == 1
    torch.testing.assert_close(gm(x), pair(x))
    with pytest.raises(TypeError, match="a FuseConfig or keyword options, not both"):
        fxfuse.fuse_linears(gm, fxfuse.FuseConfig(), strict=True)
    with pytest.raises(ValueError, match="unknown fxfuse option 'min_grup_size'"):
        fxfuse.fuse_linears(gm, min_grup_size=3)
