"""Whole-model counts: the architectures fxfuse exists for."""

from __future__ import annotations

import copy

import torch
from torch import nn

import fxfuse
from fxfuse.models import LlamaConfig, Transformer

from conftest import capture_with_inputs


def fused_report(model, *args):
    gm, inputs = capture_with_inputs(model, *args)
    with torch.no_grad():
        ref = model(*args)
    report = fxfuse.fuse_linears(gm)
    with torch.no_grad():
        out = gm(*inputs)
    torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else tuple(out),
                               ref if isinstance(ref, tuple) else ref)
    return report


class Layers(nn.Module):
    """The decoder layers of a LLaMA-style model, without embedding and head."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, x):
        m = self.model
        idx = torch.arange(x.shape[1])
        cos, sin = m.cos[idx].unsqueeze(1), m.sin[idx].unsqueeze(1)
        for layer in m.layers:
            x = layer(x, cos, sin, None)
        return x


def test_llama_32_layers_224_to_128():
    cfg = LlamaConfig(n_layer=32, dim=32, n_head=4, n_kv_head=2, hidden=48)
    report = fused_report(Layers(Transformer(cfg)), torch.randn(1, 4, 32))
    assert (report.before, report.after, report.removed) == (224, 128, 96)
    assert len(report.groups) == 64
    assert report.groups[0].members == ("model.layers.0.attention.wq", "model.layers.0.attention.wk",
                                        "model.layers.0.attention.wv")
    assert report.groups[0].widths == (32, 16, 16)  # grouped-query attention
    assert report.groups[1].members == ("model.layers.0.feed_forward.w1", "model.layers.0.feed_forward.w3")


class GPTJBlock(nn.Module):
    """Parallel attention + MLP on one LayerNorm output; q/k/v without bias, fc_in with."""

    def __init__(self, d=32, h=4):
        super().__init__()
        self.h = h
        self.ln = nn.LayerNorm(d)
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.out = nn.Linear(d, d, bias=False)
        self.fc_in, self.fc_out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, S, D = x.shape
        h = self.ln(x)
        q, k, v = (t(h).view(B, S, self.h, -1).transpose(1, 2) for t in (self.q, self.k, self.v))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        a = self.out(a.transpose(1, 2).reshape(B, S, D))
        return x + a + self.fc_out(nn.functional.gelu(self.fc_in(h)))


def test_gptj_block_loses_3_calls():
    report = fused_report(GPTJBlock(), torch.randn(2, 5, 32))
    assert report.removed == 3
    (group,) = report.groups
    assert group.members == ("q", "k", "v", "fc_in") and group.bias == (False, False, False, True)


class CrossDecoder(nn.Module):
    """Three decoder layers, each projecting one encoder output with k and v."""

    def __init__(self, d=32, n=3):
        super().__init__()
        self.q = nn.ModuleList(nn.Linear(d, d) for _ in range(n))
        self.k = nn.ModuleList(nn.Linear(d, d) for _ in range(n))
        self.v = nn.ModuleList(nn.Linear(d, d) for _ in range(n))

    def forward(self, x, enc):
        for q, k, v in zip(self.q, self.k, self.v):
            x = x + nn.functional.scaled_dot_product_attention(q(x), k(enc), v(enc))
        return x


def test_decoder_cross_attention_k_v_of_every_layer_lose_5():
    report = fused_report(CrossDecoder(), torch.randn(2, 4, 32), torch.randn(2, 6, 32))
    assert report.removed == 5
    (group,) = report.groups
    assert group.members == ("k.0", "v.0", "k.1", "v.1", "k.2", "v.2")


def _through_backend(model, inner, *args, dynamic=False):
    """Compile with fxfuse (training on: gradients needed), compare outputs and
    every parameter's gradient with an eager twin."""
    twin = copy.deepcopy(model)
    be = fxfuse.backend(inner=inner, training=True)
    out = torch.compile(model, backend=be, dynamic=dynamic)(*args)
    ref = twin(*args)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    ref.sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    return be.report


def test_gptj_block_inductor_with_gradients():
    report = _through_backend(GPTJBlock(), "inductor", torch.randn(2, 5, 32))
    assert report.removed == 3


def test_cross_decoder_eager_with_gradients_and_dynamic_shapes():
    report = _through_backend(CrossDecoder(), "eager", torch.randn(2, 4, 32), torch.randn(2, 6, 32), dynamic=True)
    assert report.removed == 5
