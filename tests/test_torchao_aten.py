"""torchao-quantized siblings after AOTAutograd has taken the subclass apart:
in torch.export programs (`fuse_exported`) and in Inductor's post-grad hook.
The members' stored rows (int8 / float8 data, per-row scales) are
concatenated and the member's own aten subgraph runs once (qforms.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse import Reason

from test_inductor import _no_compile_caches  # noqa: F401 - the autouse fixture: passes must run
from test_torchao import CONFIGS, DTYPE, TOKENS, X, Pair, quantized_llama, quantized_pair

quantization = pytest.importorskip("torchao.quantization")

aten = torch.ops.aten
GEMMS = (aten.mm.default, aten.addmm.default, aten._int_mm.default, aten.matmul.default, aten.linear.default)


def gemms(graph: torch.fx.Graph) -> int:
    return sum(1 for n in graph.nodes if n.target in GEMMS)


def stored_bytes(state: dict) -> int:
    """Bytes of a state dict, a torchao weight counted by its inner tensors."""
    total = 0
    for t in state.values():
        inner = [getattr(t, k) for k in t.__tensor_flatten__()[0]] if hasattr(t, "__tensor_flatten__") else [t]
        total += sum(i.numel() * i.element_size() for i in inner)
    return total


# ------------------------------------------------------------ fuse_exported


@pytest.mark.parametrize("config", list(CONFIGS))
def test_fuse_exported_torchao_llama_removes_6_and_matches_unfused(config):
    model = quantized_llama(config)
    ep = torch.export.export(model, (TOKENS,))
    before = gemms(ep.graph)
    fused = fxfuse.fuse_exported(ep)
    assert gemms(ep.graph) == before, "the input program is left as it was"
    assert before - gemms(fused.graph) == 6 and fused.fxfuse_report.removed == 6
    assert {g.weights for g in fused.fxfuse_report.groups} == {"storage"}
    # No second copy: the members' inner tensors left the program with them
    # (Int8Tensor's zero points, which its symmetric kernels never read, too).
    assert stored_bytes(fused.state_dict) <= stored_bytes(ep.state_dict)
    assert "layers.0.attention.wq.weight" not in fused.state_dict
    fused.validate()
    with torch.no_grad():
        torch.testing.assert_close(fused.module()(TOKENS), model(TOKENS))


@pytest.mark.parametrize("vnni", [False, True], ids=["int8_x_int8", "uint8_x_int8"])
def test_fuse_exported_int8_dynamic_on_either_cpu_path(vnni, monkeypatch):
    # torchao picks its CPU int8 GEMM by the CPU: with VNNI (and no AMX) it
    # runs uint8 x int8 (x + 128) and subtracts 128 * the weight's column sums
    # in place. Both forms fuse, whichever CPU runs the test.
    from torchao.kernel import intmm

    monkeypatch.setattr(intmm, "_cpu_is_vnni_supported", lambda: vnni)
    monkeypatch.setattr(intmm, "_cpu_is_amx_tile_supported", lambda: False)
    model = quantized_llama("int8_dynamic")
    ep = torch.export.export(model, (TOKENS,))
    assert ("aten.sub_.Tensor(_int_mm" in ep.graph_module.code) == vnni
    fused = fxfuse.fuse_exported(ep)
    assert fused.fxfuse_report.removed == 6 and not fused.fxfuse_report.skipped
    with torch.no_grad():
        torch.testing.assert_close(fused.module()(TOKENS), model(TOKENS))


def test_fuse_exported_torchao_quantized_rows_are_never_dequantized():
    model = quantized_llama("int8_dynamic")
    fused = fxfuse.fuse_exported(torch.export.export(model, (TOKENS,)))
    weight = fused.state_dict["fxfuse.fused_0.weight"]
    attention = model.layers[0].attention
    assert weight.dtype == torch.int8
    torch.testing.assert_close(weight, torch.cat([m.weight.qdata for m in (attention.wq, attention.wk, attention.wv)]),
                               rtol=0, atol=0)


def assert_exported_left_alone(model, reason: Reason, calls: int):
    ep = torch.export.export(model, (X,))
    fused = fxfuse.fuse_exported(ep)
    assert fused.graph_module.code == ep.graph_module.code
    assert fused.fxfuse_report.removed == 0 and fused.fxfuse_report.skipped == {reason.value: calls}
    with torch.no_grad():
        for a, b in zip(fused.module()(X), model(X)):
            torch.testing.assert_close(a, b)


def test_no_fuse_quantized_scales_not_per_row():
    # One scale per tensor: the fused rows would need one scale for both.
    config = quantization.Int8WeightOnlyConfig(granularity=quantization.PerTensor(), set_inductor_config=False)
    assert_exported_left_alone(quantized_pair(config), Reason.QUANT_NOT_PER_ROW, 2)


def test_no_fuse_quantization_metadata_mismatch():
    # Both Int8Tensor; only b quantizes its activations: other subgraphs.
    model = quantized_pair(CONFIGS["int8_weight_only"](), CONFIGS["int8_dynamic"]())
    assert_exported_left_alone(model, Reason.QUANT_METADATA_MISMATCH, 2)


def test_no_fuse_dequantization_mismatch():
    model = quantized_pair(CONFIGS["float8_weight_only"]())
    model.b = nn.Linear(64, 48, bias=False).to(DTYPE)  # a plain sibling
    assert_exported_left_alone(model, Reason.QUANT_MISMATCH, 2)


# ------------------------------------------------------------ Inductor's post-grad hook


def post_grad(model, freezing: bool, pass_=None, tokens=TOKENS):
    """Compile `model` with Inductor, `pass_` (if any) in the post-grad hook;
    the outputs, and the graph's code and GEMM count before and after it."""
    seen = []

    def hook(graph):
        before = (graph.python_code("self").src, gemms(graph))
        if pass_ is not None:
            pass_(graph)
        seen.append((before, (graph.python_code("self").src, gemms(graph))))

    torch._dynamo.reset()
    # On CPUs with bf16 support, freezing packs bf16 weights for oneDNN before
    # the post-grad passes (`cpp.weight_prepack`), which leaves that hook no
    # GEMM to fuse (docs/guide.md); GPUs keep the mm.
    patches = dict(freezing=freezing, post_grad_custom_pre_pass=hook, **{"cpp.weight_prepack": False})
    with torch._inductor.config.patch(patches), torch.no_grad():
        out = torch.compile(model)(tokens)
    assert len(seen) == 1
    return out, seen[0]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_fuse_torchao_llama_in_post_grad_hook_with_freezing(config):
    model = quantized_llama(config)
    expected, _ = post_grad(model, freezing=True)
    p = fxfuse.inductor_pass()
    out, ((_, before), (_, after)) = post_grad(model, freezing=True, pass_=p)
    assert before - after == 6 and p.report.removed == 6 and not p.report.skipped
    # The fused GEMM has another N, for which the CPU's bf16 GEMM may sum K
    # in another order: up to one bf16 rounding step of the largest output
    # (compiling the unfused model already moves the outputs more than that).
    ulp = torch.finfo(DTYPE).eps * expected.abs().max().item()
    torch.testing.assert_close(out, expected, rtol=1.6e-2, atol=ulp)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_no_fuse_quantized_weights_concatenated_per_call(config):
    # Without freezing the stored rows are graph inputs: fusing would
    # concatenate every int8 / float8 weight again on every call.
    # The graph Inductor compiles is its own, so its outputs are the unfused ones.
    p = fxfuse.inductor_pass()
    _, (before, after) = post_grad(quantized_llama(config), freezing=False, pass_=p)
    assert after == before
    # Every sibling call is left alone: q, k, v, w1 and w3 of both layers.
    assert p.report.removed == 0 and p.report.skipped == {Reason.QUANT_CONCAT_PER_CALL.value: 10}


# ------------------------------------------------------------ float8 with dynamic activations


@pytest.fixture
def float8_dynamic():
    """`Float8DynamicActivationFloat8WeightConfig` factory, usable on CPU.

    torchao asserts a GPU with float8 support when it quantizes (its fast
    kernels need one); torch's CPU `_scaled_mm` computes the same row-wise
    scaled GEMM, so the tests lift that one check while `quantize_` runs and
    everything after it is torchao's and torch's own code."""
    from unittest import mock

    from torchao.quantization import quant_api

    def quantize(model, granularity=None):
        config = quantization.Float8DynamicActivationFloat8WeightConfig(
            granularity=granularity or quantization.PerRow(), set_inductor_config=False)
        with mock.patch.object(quant_api, "_check_hardware_support", lambda granularity: None):
            quantization.quantize_(model, config)
        return model

    return quantize


# On CPU torch's reference `_scaled_mm`; on a GPU (sm89+) the kernels
# torchao quantizes for. Every dim of the test model is a multiple of 16,
# as CUDA's `_scaled_mm` asks.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs a GPU with float8"))]


def float8_llama(quantize, device: str = "cpu"):
    torch.manual_seed(0)
    from fxfuse.models import LlamaConfig, Transformer

    return quantize(Transformer(LlamaConfig(n_layer=2)).to(device=device, dtype=DTYPE).eval())


def one_rounding(expected: torch.Tensor) -> dict:
    """The fused GEMM has another N, for which a GPU's GEMM may sum K in
    another order: up to one bf16 rounding step of the largest output. (On
    CPU, assert_close's defaults.)"""
    if expected.device.type == "cpu":
        return {}
    return dict(rtol=1.6e-2, atol=torch.finfo(DTYPE).eps * expected.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_fuse_exported_float8_dynamic_per_row(float8_dynamic, device):
    # _scaled_mm(quantized x, t(qdata), x's scales, t(scale)): the weight's
    # rows and its per-row scales are concatenated once; x is quantized once.
    model, tokens = float8_llama(float8_dynamic, device), TOKENS.to(device)
    ep = torch.export.export(model, (tokens,))
    scaled_mm = aten._scaled_mm.default
    before = sum(n.target is scaled_mm for n in ep.graph.nodes)
    fused = fxfuse.fuse_exported(ep)
    assert before - sum(n.target is scaled_mm for n in fused.graph.nodes) == 6
    assert fused.fxfuse_report.removed == 6 and not fused.fxfuse_report.skipped
    assert stored_bytes(fused.state_dict) <= stored_bytes(ep.state_dict)
    fused.validate()
    with torch.no_grad():
        expected = model(tokens)
        torch.testing.assert_close(fused.module()(tokens), expected, **one_rounding(expected))


@pytest.mark.parametrize("device", DEVICES)
def test_fuse_float8_dynamic_per_row_in_post_grad_hook_with_freezing(float8_dynamic, device):
    model, tokens = float8_llama(float8_dynamic, device), TOKENS.to(device)
    expected, _ = post_grad(model, freezing=True, tokens=tokens)
    p = fxfuse.inductor_pass()
    out, ((before, _), (after, _)) = post_grad(model, freezing=True, pass_=p, tokens=tokens)
    assert before.count("aten._scaled_mm.default(") - after.count("aten._scaled_mm.default(") == 6
    assert p.report.removed == 6 and not p.report.skipped
    torch.testing.assert_close(out, expected, **one_rounding(expected))


@pytest.mark.parametrize("device,inner", [("cpu", "eager"), pytest.param(*DEVICES[1].values, "inductor",
                                                                         marks=DEVICES[1].marks)])
def test_fuse_float8_dynamic_per_row_backend(float8_dynamic, device, inner):
    model, tokens = float8_llama(float8_dynamic, device), TOKENS.to(device)
    be = fxfuse.backend(inner=inner)
    with torch.no_grad():
        expected = model(tokens)
        if inner == "inductor":  # compiled unfused: what fusing may change is the GEMM's N only
            torch._dynamo.reset()
            expected = torch.compile(model)(tokens)
            torch._dynamo.reset()
        out = torch.compile(model, backend=be)(tokens)
    torch.testing.assert_close(out, expected, **one_rounding(expected))
    assert be.report.removed == 6 and not be.report.skipped


def test_no_fuse_float8_dynamic_per_tensor_scales_not_per_row(float8_dynamic):
    # One scale for each whole weight: the joined rows would need one for all.
    model = float8_dynamic(Pair().to(DTYPE).eval(), quantization.PerTensor())
    assert_exported_left_alone(model, Reason.QUANT_NOT_PER_ROW, 2)
