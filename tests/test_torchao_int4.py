"""torchao int4 weight-only siblings: the backend joins their packed rows (a
view of one storage) and their scales and zero points (a buffer rewritten
from the members on every call, quantized.py), never dequantizing.

Formats with a kernel here: Int4OpaqueTensor (CPU tinygemm,
PrototypeInt4WeightOnlyConfig) and Int4TilePackedTo4dTensor
(`Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d")`, CUDA
tinygemm, tested only with a GPU). The plain and preshuffled formats need
mslk/fbgemm kernels, and their classes are refused as layouts not known.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse import Reason
from fxfuse.models import LlamaConfig, Transformer

from test_inductor import _no_compile_caches  # noqa: F401 - the autouse fixture: passes must run
from test_torchao import assert_backend_left_alone, quantized_bytes, shares_storage

quantization = pytest.importorskip("torchao.quantization")
int4_cpu = pytest.importorskip("torchao.prototype.quantization.int4")

TOKENS = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
DTYPE = torch.bfloat16
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

# Every sibling's rows fill whole packing tiles (64 rows on CPU, 16 on CUDA):
# wq 128, wk/wv 64, w1/w3 256. The default test config (wk 32, w1 176) is
# refused on CPU for that reason (test_no_fuse_quantized_rows_not_tile_aligned).
TILED = dict(dim=128, n_head=4, n_kv_head=2, hidden=256)


def cpu_config(group_size: int = 32):
    return int4_cpu.PrototypeInt4WeightOnlyConfig(group_size=group_size, set_inductor_config=False)


def cuda_config(group_size: int = 64):
    return quantization.Int4WeightOnlyConfig(
        group_size=group_size, int4_packing_format="tile_packed_to_4d", set_inductor_config=False)


FORMATS = {
    "opaque_cpu": pytest.param(("cpu", cpu_config, "Int4OpaqueTensor"), id="opaque_cpu"),
    "tile_packed_to_4d_cuda": pytest.param(("cuda", cuda_config, "Int4TilePackedTo4dTensor"),
                                           id="tile_packed_to_4d_cuda", marks=needs_cuda),
}


def same(device: str) -> dict:
    """assert_close's tolerance: bitwise. Each output column is computed
    alone whatever the number of rows: measured on CPU; on CUDA tinygemm
    runs one kernel configuration for every shape, without split-K."""
    return dict(rtol=0, atol=0)


def int4_llama(device: str, config, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(LlamaConfig(n_layer=2, **TILED)).to(device=device, dtype=DTYPE).eval()
    quantization.quantize_(model, config())
    return model


def inner_bytes(model: nn.Module, name: str) -> int:
    """Bytes of the distinct storages behind one inner tensor of every quantized weight."""
    ts = [getattr(p, name) for p in model.parameters() if hasattr(p, "__tensor_flatten__")]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts}.values())


# ------------------------------------------------------------ fused


@pytest.mark.parametrize("fmt", FORMATS.values())
def test_fuse_int4_llama_removes_6_and_matches_unfused(fmt):
    device, config, class_name = fmt
    model = int4_llama(device, config)
    tokens = TOKENS.to(device)
    attention = model.layers[0].attention
    assert type(attention.wq.weight).__name__ == class_name
    with torch.no_grad():
        expected = model(tokens)
    before, packed_before = quantized_bytes(model), inner_bytes(model, "qdata")
    be = fxfuse.backend(inner="eager")
    fn = torch.compile(model, backend=be)
    with torch.no_grad():
        torch.testing.assert_close(fn(tokens), expected, **same(device))
    assert be.report.removed == 6 and {g.weights for g in be.report.groups} == {"storage"}
    assert not be.report.skipped
    # The packed rows: views of one storage, no second copy.
    assert inner_bytes(model, "qdata") == packed_before
    assert shares_storage(attention.wq.weight.qdata, attention.wv.weight.qdata)
    # The scales and zero points keep their own tensors (their rows are dim 1:
    # a member's slice of a joined one would not be contiguous); the graph
    # joins them, so the fused weight's own hold no memory.
    assert not shares_storage(attention.wq.weight.scale_and_zero, attention.wv.weight.scale_and_zero)
    assert quantized_bytes(model) == before
    fused = [t for t in fn_fused_weights(model) if type(t).__name__ == class_name]
    assert len(fused) == 4
    for t in fused:
        assert t.scale_and_zero.untyped_storage().nbytes() <= t.scale_and_zero.element_size()
    # Other quantized weights loaded in place reach the compiled model.
    other = int4_llama(device, config, seed=1)
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fn(tokens), other(tokens), **same(device))
        torch.testing.assert_close(fn(tokens), model(tokens), **same(device))
    assert inner_bytes(model, "qdata") == packed_before


def fn_fused_weights(model: nn.Module) -> list[torch.Tensor]:
    """The fused weights the backend holds for `model`'s groups (found
    through the storage of each group's first packed rows)."""
    from fxfuse.weights import _REGISTRY

    out = []
    for layer in model.layers:
        for first in (layer.attention.wq, layer.feed_forward.w1):
            st = _REGISTRY.get(first.weight.qdata)
            assert st is not None
            out.append(st.subclass.fused)
    return out


@pytest.mark.parametrize("fmt", FORMATS.values())
def test_fuse_int4_in_place_edits_and_replaced_parameter(fmt):
    device, config, _ = fmt
    model = int4_llama(device, config)
    tokens = TOKENS.to(device)
    fn = torch.compile(model, backend=fxfuse.backend(inner="eager"))
    with torch.no_grad():
        fn(tokens)
        ffn, attention = model.layers[1].feed_forward, model.layers[0].attention
        # Packed rows: edited in place in the shared storage.
        ffn.w3.weight.qdata.copy_(torch.flip(ffn.w3.weight.qdata, dims=(1,)))
        # Scales: edited in place, and through `.data` (which no version counter sees).
        ffn.w1.weight.scale_and_zero.mul_(2)
        attention.wk.weight.scale_and_zero.data[..., 0].mul_(0.5)
        torch.testing.assert_close(fn(tokens), model(tokens), **same(device))
        # A new Parameter in place of a member: its rows copied in, its scales read.
        other = int4_llama(device, config, seed=1)
        attention.wv.weight = other.layers[0].attention.wv.weight
        torch.testing.assert_close(fn(tokens), model(tokens), **same(device))
        assert shares_storage(attention.wv.weight.qdata, attention.wq.weight.qdata)
        # A new scale tensor set on a member: read on the next call.
        attention.wq.weight.scale_and_zero = attention.wq.weight.scale_and_zero * 2
        torch.testing.assert_close(fn(tokens), model(tokens), **same(device))


@pytest.mark.parametrize("fmt", FORMATS.values())
def test_fuse_int4_llama_inductor(fmt):
    # Inside AOTAutograd the fused weight is unwrapped: its packed rows and
    # the members' own scales, joined in the graph, are inputs of the int4 GEMM.
    device, config, _ = fmt
    model = int4_llama(device, config)
    tokens = TOKENS.to(device)
    be = fxfuse.backend(inner="inductor")
    with torch.no_grad():
        expected = torch.compile(model)(tokens)
        torch._dynamo.reset()
        fn = torch.compile(model, backend=be)
        torch.testing.assert_close(fn(tokens), expected, **same(device))
        # An edit through `.data` (no version counter sees it) reaches the next call.
        model.layers[1].attention.wk.weight.scale_and_zero.data.mul_(2)
        out = fn(tokens)
        torch._dynamo.reset()
        torch.testing.assert_close(out, torch.compile(model)(tokens), **same(device))
    assert be.report.removed == 6 and not be.report.errors


def test_fuse_int4_inner_compiler_failure_compiles_unfused():
    """The inner compiler rejects the fused graph: the packed rows go back to
    their own memory before Dynamo's graph is compiled (its fake tensors were
    made from them there), and the result is the unfused model's."""
    from test_faults import fails_on_fused_graphs

    model = int4_llama("cpu", cpu_config)
    be = fxfuse.backend(inner=fails_on_fused_graphs)
    with torch.no_grad():
        expected = model(TOKENS)
        torch.testing.assert_close(torch.compile(model, backend=be)(TOKENS), expected, rtol=0, atol=0)
    assert be.report.removed == 0 and be.report.errors
    attention = model.layers[0].attention
    assert not shares_storage(attention.wq.weight.qdata, attention.wk.weight.qdata)


def test_fuse_int4_unfuse_gives_each_member_its_storage():
    model = int4_llama("cpu", cpu_config)
    fn = torch.compile(model, backend=fxfuse.backend(inner="eager"))
    with torch.no_grad():
        expected = fn(TOKENS)
        attention = model.layers[0].attention
        assert fxfuse.unfuse(model) > 0
        assert not shares_storage(attention.wq.weight.qdata, attention.wk.weight.qdata)
        torch.testing.assert_close(fn(TOKENS), expected, rtol=0, atol=0)  # re-fused on this call
    assert shares_storage(attention.wq.weight.qdata, attention.wk.weight.qdata)


# ------------------------------------------------------------ refused


class Pair(nn.Module):
    def __init__(self, a: int, b: int, k: int = 64):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(k, a, bias=False), nn.Linear(k, b, bias=False)

    def forward(self, x):
        return self.a(x), self.b(x)


def int4_pair(a: int, b: int, config_a, config_b=None, device: str = "cpu") -> Pair:
    model = Pair(a, b).to(device=device, dtype=DTYPE).eval()
    quantization.quantize_(model, config_a, filter_fn=lambda m, name: name == "a")
    quantization.quantize_(model, config_b or config_a, filter_fn=lambda m, name: name == "b")
    return model


X = torch.randn(3, 64, dtype=DTYPE, generator=torch.Generator().manual_seed(1))


def test_fuse_int4_pair_of_whole_tiles():
    # The other side of the tile limit below: 64 + 128 rows fuse.
    model = int4_pair(64, 128, cpu_config())
    be = fxfuse.backend(inner="eager")
    with torch.no_grad():
        for a, b in zip(torch.compile(model, backend=be)(X), model(X)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert be.report.removed == 1


def test_no_fuse_quantized_rows_not_tile_aligned():
    # CPU int4 packs rows in blocks of 64 (32 with AVX2): a 32-row member's
    # rows, packed as a short last block, would be read as half of a full one.
    model = int4_pair(32, 48, cpu_config())
    assert_backend_left_alone(model, (X,), Reason.QUANT_NOT_TILE_ALIGNED, 2)


@needs_cuda
def test_no_fuse_quantized_rows_not_tile_aligned_cuda():
    # tinygemm pads the rows to 8 (tiles of 16 on ROCm): a 36-row member's
    # padding would sit inside the joined rows.
    model = int4_pair(36, 44, cuda_config(), device="cuda")
    assert model.a.weight.qdata.shape[0] * 8 == 40
    assert_backend_left_alone(model, (X.cuda(),), Reason.QUANT_NOT_TILE_ALIGNED, 2)


def test_no_fuse_int4_group_size_mismatch():
    model = int4_pair(64, 128, cpu_config(32), cpu_config(64))
    assert_backend_left_alone(model, (X,), Reason.QUANT_METADATA_MISMATCH, 2)


def test_no_fuse_int4_next_to_int8():
    model = int4_pair(64, 128, cpu_config(), quantization.Int8WeightOnlyConfig(set_inductor_config=False))
    assert_backend_left_alone(model, (X,), Reason.QUANT_SUBCLASS_MISMATCH, 2)


def test_no_fuse_int4_with_activation_pre_scale():
    # A pre-scale of the input channels (AWQ) is one per member: a joined
    # tensor would need one for all, which no later update could keep true.
    model = int4_pair(64, 128, cpu_config())
    for w in (model.a.weight, model.b.weight):
        w.act_pre_scale = torch.ones(64, dtype=DTYPE)
    assert_backend_left_alone(model, (X,), Reason.QUANT_NOT_PER_ROW, 2)
