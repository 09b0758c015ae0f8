"""Weight-only int8 siblings: ``linear(x, w_int8.to(dt)) * scales (+ b)``,
at the torch level and in aten graphs (Inductor's hooks, torch.export)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._inductor.utils import run_and_get_code
from torch.fx.experimental.proxy_tensor import make_fx

import fxfuse
from fxfuse import Reason
from fxfuse.inductor import HOOKS, _appended
from fxfuse.models import Int8Linear, LlamaConfig, Transformer, quantize_int8

from conftest import call_ops, capture_with_inputs, n_linear
from test_inductor import GEMM, _no_compile_caches  # noqa: F401 - the autouse fixture: passes must run

TOKENS = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
aten = torch.ops.aten


def int8_llama():
    torch.manual_seed(0)
    return quantize_int8(Transformer(LlamaConfig(n_layer=2, q_bias=True))).eval()


def rel_close(a, b, rtol=1e-4):
    err = ((a - b).norm() / b.norm()).item()
    assert err <= rtol, f"relative error {err:.2e}"


class QKV(nn.Module):
    """int8 q (with a bias), k and v reading one input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q = Int8Linear(torch.randn(8, 16), torch.randn(8))
        self.k, self.v = Int8Linear(torch.randn(4, 16)), Int8Linear(torch.randn(4, 16))

    def forward(self, x):
        return self.q(x), self.k(x), self.v(x)


class Mixed(nn.Module):
    """An int8 sibling and a plain one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k = Int8Linear(torch.randn(8, 16)), nn.Linear(16, 8, bias=False)

    def forward(self, x):
        return self.q(x), self.k(x)


@contextlib.contextmanager
def aten_graphs(hook):
    """fxfuse in an aten `hook`; yields the pass and the structural view
    (`call_ops`) of each graph just before and just after it."""
    before: list = []
    after: list = []
    config = torch._inductor.config
    with config.patch({hook: lambda g: before.append(call_ops(g.owning_module))}):
        with fxfuse.installed(hook) as p:
            # After fxfuse in the same hook (torch 2.11's hooks take one pass: chained).
            then = _appended(getattr(config, hook), lambda g: after.append(call_ops(g.owning_module)))
            with config.patch({hook: then}):
                yield p, before, after


# ------------------------------------------------------------ torch level


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
    gm, inputs = capture_with_inputs(Mixed(), torch.randn(3, 16))
    code = gm.code
    report = fxfuse.fuse_linears(gm)
    assert gm.code == code and report.skipped == {Reason.QUANT_MISMATCH.value: 2}


def test_no_fuse_int8_backend_weights_that_cannot_be_stored():
    # int8 weights passed in as arguments: no storage can hold them across
    # calls, and concatenating them on every call would copy each weight again.
    def f(x, w1, s1, w2, s2):
        return F.linear(x, w1.to(x.dtype)) * s1, F.linear(x, w2.to(x.dtype)) * s2

    int8 = lambda *shape: torch.randint(-128, 127, shape, dtype=torch.int8)  # noqa: E731
    args = (torch.randn(3, 8), int8(4, 8), torch.rand(4), int8(2, 8), torch.rand(2))
    seen = []

    def inner(gm, example_inputs):  # sees the graph fxfuse hands on
        seen.append(call_ops(gm))
        return gm.forward

    be = fxfuse.backend(inner=inner)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(f, backend=be)(*args), f(*args))
        gm, _ = capture_with_inputs(f, *args)
    assert seen == [call_ops(gm)]  # as Dynamo traced it
    assert be.report.removed == 0 and be.report.skipped == {Reason.QUANT_CONCAT_PER_CALL.value: 2}
    # Asked for by name, the in-graph concatenation is still made.
    torch._dynamo.reset()
    be = fxfuse.backend(inner="eager", weights="cat")
    with torch.no_grad():
        rel_close(torch.cat(torch.compile(f, backend=be)(*args), -1), torch.cat(f(*args), -1))
    assert be.report.removed == 1


def test_cast_only_weights_fuse_before_the_cast():
    def f(x, w1, w2):  # bf16 weights computed in fp32: cast once after concatenating
        return F.linear(x, w1.to(torch.float32)), F.linear(x, w2.to(torch.float32))

    args = (torch.randn(3, 8), torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(2, 8, dtype=torch.bfloat16))
    gm, inputs = capture_with_inputs(f, *args)
    ref = f(*args)
    assert fxfuse.fuse_linears(gm).removed == 1
    assert call_ops(gm).count(".to") == 1
    torch.testing.assert_close(tuple(gm(*inputs)), ref)


# ------------------------------------------------------------ aten level


# Freezing makes the concatenated int8 weights one constant (on CPU it also
# folds the int8 -> float32 cast; MKL packing is kept off so GEMMs stay mm).
FREEZING = {"fx_graph_cache": False, "freezing": True, "cpp.weight_prepack": False}


@pytest.fixture(scope="module")
def int8_baseline():
    """The int8 model's eager output and Inductor's GEMM calls without fxfuse (frozen)."""
    model = int8_llama()
    with torch.no_grad(), torch._inductor.config.patch(FREEZING):
        ref = model(TOKENS)
        _, codes = run_and_get_code(torch.compile(model), TOKENS)
    torch._dynamo.reset()
    return ref, sum(len(GEMM.findall(c)) for c in codes)


@pytest.mark.parametrize("hook", HOOKS)
def test_fuse_int8_llama_inductor_hook_removes_6_gemms(hook, int8_baseline):
    ref, base = int8_baseline  # 15: 7 int8 linears a layer and the plain output projection
    with fxfuse.installed(hook) as p, torch.no_grad(), torch._inductor.config.patch(FREEZING):
        out, codes = run_and_get_code(torch.compile(int8_llama()), TOKENS)
    rel_close(out, ref)
    assert p.report.removed == 6 and base - sum(len(GEMM.findall(c)) for c in codes) == 6


@pytest.mark.parametrize("hook", HOOKS)
def test_no_fuse_int8_hook_without_freezing(hook):
    # The weights are graph inputs: fusing would concatenate the int8 weights
    # on every call. q,k,v and w1,w3 of 2 layers are left alone.
    model = int8_llama()
    with aten_graphs(hook) as (p, before, after), torch.no_grad():
        out = torch.compile(model)(TOKENS)
    assert before == after and p.report.removed == 0
    assert p.report.skipped == {Reason.QUANT_CONCAT_PER_CALL.value: 10}
    with torch.no_grad():
        torch.testing.assert_close(out, model(TOKENS))


def test_fuse_int8_aten_graph_casts_concatenated_weights_once():
    # The joint hook under freezing: the concatenations below become constants.
    model, x = QKV(), torch.randn(2, 3, 16)
    hook = "joint_custom_pre_pass"
    with aten_graphs(hook) as (p, before, after), torch.no_grad(), torch._inductor.config.patch(FREEZING):
        out = torch.compile(model)(x)
    (ops_before,), (ops,) = before, after
    assert p.report.removed == 2 and ops_before.count("convert_element_type.default") == 3
    # Before: per member a cast, a permute, an mm, a view, a multiply (+ the
    # bias add). After: int8 weights, scales and biases (zeros for k and v)
    # each concatenated once, then one cast, one mm, one view back to
    # [2, 3, 16], one multiply, one bias add, one split.
    assert ops.count("cat.default") == 3 and ops.count("full.default") == 2
    for op in ("convert_element_type.default", "mm.default", "mul.Tensor", "add.Tensor", "split_with_sizes.default"):
        assert ops.count(op) == 1, op
    with torch.no_grad():
        rel_close(torch.cat(out, -1), torch.cat(model(x), -1))


@pytest.mark.parametrize("hook", ["joint_custom_pre_pass", "post_grad_custom_pre_pass"])
def test_no_fuse_int8_with_plain_sibling_aten(hook):
    model, x = Mixed(), torch.randn(2, 3, 16)
    with aten_graphs(hook) as (p, before, after), torch.no_grad():
        out = torch.compile(model)(x)
    assert before == after and p.report.skipped == {Reason.QUANT_MISMATCH.value: 2}
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))


@pytest.mark.parametrize("scaled", [False, True], ids=["cast_only", "scaled"])
@pytest.mark.parametrize("cast_first", [True, False], ids=["t_of_cast", "cast_of_t"])
def test_fuse_aten_cast_before_or_after_transpose(cast_first, scaled):
    # AOTAutograd casts the stored weight, then transposes it; torchao's
    # traced kernels transpose, then cast. Either way: one cast, after the cat.
    def f(x, w1, s1, w2, s2):
        ys = [x @ (w.to(torch.float32).t() if cast_first else w.t().to(torch.float32)) for w in (w1, w2)]
        return tuple(y * s for y, s in zip(ys, (s1, s2))) if scaled else tuple(ys)

    int8 = lambda *shape: torch.randint(-128, 127, shape, dtype=torch.int8)  # noqa: E731
    args = (torch.randn(3, 8), int8(4, 8), torch.rand(4), int8(2, 8), torch.rand(2))
    gm = make_fx(f)(*args)
    assert fxfuse.fuse_linears(gm).removed == 1
    ops = call_ops(gm)
    assert ops.count("_to_copy.default") == 1 and ops.count("mm.default") == 1
    assert ops.count("mul.Tensor") == scaled and ops.count("cat.default") == 1 + scaled
    torch.testing.assert_close(gm(*args), f(*args))


def _casts(ep) -> int:
    return sum(n.target in (aten.to.dtype, aten._to_copy.default) for n in ep.graph.nodes)


@pytest.mark.parametrize("decomposed", [False, True], ids=["linear", "decomposed"])
def test_fuse_exported_int8_removes_6_and_matches_eager(decomposed):
    # export keeps aten.linear(x, aten.to(w, f32)); run_decompositions makes
    # the cast aten._to_copy and the linear mm/addmm over views.
    model = int8_llama()
    ep = torch.export.export(model, (TOKENS,))
    ep = ep.run_decompositions() if decomposed else ep
    fused = fxfuse.fuse_exported(ep)
    assert fused.fxfuse_report.removed == 6 and n_linear(ep.graph_module) - n_linear(fused.graph_module) == 6
    assert _casts(ep) - _casts(fused) == 6  # one cast of the concatenated int8 weights per group
    with torch.no_grad():
        rel_close(fused.module()(TOKENS), model(TOKENS))


def test_no_fuse_exported_int8_with_plain_sibling():
    ep = torch.export.export(Mixed(), (torch.randn(3, 16),))
    fused = fxfuse.fuse_exported(ep)
    assert fused.graph_module.code == ep.graph_module.code
    assert fused.fxfuse_report.skipped == {Reason.QUANT_MISMATCH.value: 2}


# ------------------------------------------------------------ torchao


class PlainQKV(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = nn.Linear(64, 64), nn.Linear(64, 32, bias=False), nn.Linear(64, 32, bias=False)

    def forward(self, x):
        return self.q(x), self.k(x), self.v(x)


def test_no_fuse_quantized_tensor_subclass_torchao_in_graph_cat():
    # torchao's weight-only int8 weights are tensor subclasses (Int8Tensor):
    # the backend joins their rows in its storage (tests/test_torchao.py), but
    # torchao has no concatenation to put in the graph (weights="cat").
    quantization = pytest.importorskip("torchao.quantization")
    model, x = PlainQKV().eval(), torch.randn(2, 3, 64)
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig(set_inductor_config=False))
    be = fxfuse.backend(inner="eager", weights="cat")
    with torch.no_grad():
        out, ref = torch.compile(model, backend=be)(x), model(x)
    assert be.report.removed == 0 and be.report.skipped == {Reason.QUANTIZED_SUBCLASS.value: 3}
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
