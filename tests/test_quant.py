"""Weight-only int8 siblings: ``linear(x, w_int8.to(dt)) * scales (+ b)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fxfuse
from fxfuse import Reason
from fxfuse.models import Int8Linear, LlamaConfig, Transformer, quantize_int8

from conftest import call_ops, capture_with_inputs

TOKENS = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))


def int8_llama():
    torch.manual_seed(0)
    return quantize_int8(Transformer(LlamaConfig(n_layer=2, q_bias=True))).eval()


def rel_close(a, b, rtol=1e-4):
    err = ((a - b).norm() / b.norm()).item()
    assert err <= rtol, f"relative error {err:.2e}"


def test_fuse_int8_llama_removes_6_and_matches_eager():
    model = int8_llama()
    be = fxfuse.backend(inner="eager")
    fn = torch.compile(model, backend=be)
    with torch.no_grad():
        rel_close(fn(TOKENS), model(TOKENS))
    assert be.report.removed == 6 and {g.weights for g in be.report.groups} == {"storage"}
    att = model.layers[0].attention
    assert att.wq.weight.dtype == torch.int8
    assert att.wq.weight.untyped_storage().data_ptr() == att.wk.weight.untyped_storage().data_ptr()
    assert att.wq.scales.untyped_storage().data_ptr() == att.wv.scales.untyped_storage().data_ptr()
    # In-place changes of int8 weights and of scales reach the compiled model.
    with torch.no_grad():
        att.wk.weight.copy_(torch.randint(-128, 127, att.wk.weight.shape, dtype=torch.int8))
        model.layers[1].feed_forward.w3.scales.mul_(3)
        rel_close(fn(TOKENS), model(TOKENS))


def test_fuse_int8_llama_inductor():
    model = int8_llama()
    be = fxfuse.backend(inner="inductor")
    with torch.no_grad():
        rel_close(torch.compile(model, backend=be)(TOKENS), model(TOKENS))
    assert be.report.removed == 6


def test_fuse_int8_graph_concatenates_stored_weights_and_scales():
    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = Int8Linear(torch.randn(8, 16), torch.randn(8))
            self.k, self.v = Int8Linear(torch.randn(4, 16)), Int8Linear(torch.randn(4, 16))

        def forward(self, x):
            return self.q(x), self.k(x), self.v(x)

    model, x = QKV(), torch.randn(3, 16)
    gm, inputs = capture_with_inputs(model, x)
    report = fxfuse.fuse_linears(gm)
    assert report.removed == 2 and report.groups[0].bias == (True, False, False)
    # int8 weights, scales and biases each concatenated once; one cast, one GEMM,
    # one multiply, one bias add, one split.
    ops = call_ops(gm)
    assert ops.count("cat") == 3 and ops.count(".to") == 1 and ops.count("linear") == 1
    assert ops.count("mul") == 1 and ops.count("add") == 1 and ops.count("split") == 1
    with torch.no_grad():
        rel_close(torch.cat(gm(*inputs), -1), torch.cat(model(x), -1))


def test_no_fuse_int8_with_plain_sibling():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = Int8Linear(torch.randn(8, 16)), nn.Linear(16, 8, bias=False)

        def forward(self, x):
            return self.q(x), self.k(x)

    gm, inputs = capture_with_inputs(Mixed(), torch.randn(3, 16))
    code = gm.code
    report = fxfuse.fuse_linears(gm)
    assert gm.code == code and report.skipped == {Reason.QUANT_MISMATCH.value: 2}


def test_cast_only_weights_fuse_before_the_cast():
    def f(x, w1, w2):  # bf16 weights computed in fp32: cast once after concatenating
        return F.linear(x, w1.to(torch.float32)), F.linear(x, w2.to(torch.float32))

    args = (torch.randn(3, 8), torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(2, 8, dtype=torch.bfloat16))
    gm, inputs = capture_with_inputs(f, *args)
    ref = f(*args)
    assert fxfuse.fuse_linears(gm).removed == 1
    assert call_ops(gm).count(".to") == 1
    torch.testing.assert_close(tuple(gm(*inputs)), ref)
