"""torchao-quantized siblings (``quantize_``): the backend joins their rows
into one tensor of the same class, in one storage per inner tensor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxfuse
from fxfuse import Reason
from fxfuse.models import LlamaConfig, Transformer

from conftest import call_ops, capture_with_inputs
from test_inductor import _no_compile_caches  # noqa: F401 - the autouse fixture: passes must run

quantization = pytest.importorskip("torchao.quantization")

TOKENS = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
DTYPE = torch.bfloat16

# The configs whose kernels run on CPU (torchao 0.18): float8 with dynamic
# activations needs CUDA (sm89+), int4 needs mslk or CUDA.
CONFIGS = {
    "int8_weight_only": lambda: quantization.Int8WeightOnlyConfig(set_inductor_config=False),
    "int8_dynamic": lambda: quantization.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False),
    "float8_weight_only": lambda: quantization.Float8WeightOnlyConfig(set_inductor_config=False),
}


def quantized_llama(config: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(LlamaConfig(n_layer=2)).to(DTYPE).eval()
    quantization.quantize_(model, CONFIGS[config]())
    return model


def inner_tensors(model: nn.Module) -> list[torch.Tensor]:
    out = []
    for p in model.parameters():
        names, _ = p.__tensor_flatten__() if hasattr(p, "__tensor_flatten__") else ([], None)
        out += [getattr(p, n) for n in names]
    return out


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages behind the quantized weights."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in inner_tensors(model)}
    return sum(storages.values())


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# ------------------------------------------------------------ fused


@pytest.mark.parametrize("config", list(CONFIGS))
def test_fuse_torchao_llama_removes_6_and_matches_unfused(config):
    model = quantized_llama(config)
    attention = model.layers[0].attention
    weight_class = type(attention.wq.weight)
    with torch.no_grad():
        expected = model(TOKENS)
    before = quantized_bytes(model)
    be = fxfuse.backend(inner="eager")
    fn = torch.compile(model, backend=be)
    with torch.no_grad():
        torch.testing.assert_close(fn(TOKENS), expected)
    assert be.report.removed == 6 and {g.weights for g in be.report.groups} == {"storage"}
    assert not be.report.skipped
    # No second copy: the members' inner tensors are row views of one storage.
    assert quantized_bytes(model) == before
    assert type(attention.wq.weight) is weight_class
    for name in attention.wq.weight.__tensor_flatten__()[0]:
        assert shares_storage(getattr(attention.wq.weight, name), getattr(attention.wv.weight, name))
    # Other quantized weights loaded in place reach the compiled model.
    other = quantized_llama(config, seed=1)
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fn(TOKENS), other(TOKENS))
        torch.testing.assert_close(fn(TOKENS), model(TOKENS))
    assert quantized_bytes(model) == before


def test_fuse_torchao_replaced_parameter_and_in_place_edit():
    model = quantized_llama("int8_weight_only")
    fn = torch.compile(model, backend=fxfuse.backend(inner="eager"))
    with torch.no_grad():
        fn(TOKENS)
        ffn = model.layers[1].feed_forward
        ffn.w3.weight.qdata.copy_(torch.randint(-128, 127, ffn.w3.weight.shape, dtype=torch.int8))
        ffn.w1.weight.scale.mul_(2)
        torch.testing.assert_close(fn(TOKENS), model(TOKENS))
        # A new Parameter (a fresh Int8Tensor) in place of a member: copied into its rows.
        other = quantized_llama("int8_weight_only", seed=1)
        model.layers[0].attention.wk.weight = other.layers[0].attention.wk.weight
        torch.testing.assert_close(fn(TOKENS), model(TOKENS))
        wk, wq = model.layers[0].attention.wk.weight, model.layers[0].attention.wq.weight
        assert shares_storage(wk.qdata, wq.qdata)


def test_fuse_torchao_load_state_dict_assign_and_replaced_inner_tensor():
    model = quantized_llama("float8_weight_only")
    fn = torch.compile(model, backend=fxfuse.backend(inner="eager"))
    other = quantized_llama("float8_weight_only", seed=1)
    with torch.no_grad():
        fn(TOKENS)
        model.load_state_dict(other.state_dict(), assign=True)  # new tensor objects
        torch.testing.assert_close(fn(TOKENS), other(TOKENS))
        w3 = model.layers[1].feed_forward.w3.weight
        w3.scale = w3.scale * 2  # a new inner tensor, set on the same weight
        torch.testing.assert_close(fn(TOKENS), model(TOKENS))
        assert shares_storage(w3.scale, model.layers[1].feed_forward.w1.weight.scale)


def test_fuse_torchao_unfuse_gives_each_member_its_storage():
    model = quantized_llama("int8_weight_only")
    fn = torch.compile(model, backend=fxfuse.backend(inner="eager"))
    with torch.no_grad():
        expected = fn(TOKENS)
        attention = model.layers[0].attention
        assert fxfuse.unfuse(model) > 0
        assert not shares_storage(attention.wq.weight.qdata, attention.wk.weight.qdata)
        torch.testing.assert_close(fn(TOKENS), expected)  # re-fused on this call
    assert shares_storage(attention.wq.weight.qdata, attention.wk.weight.qdata)


def test_fuse_torchao_llama_inductor():
    model = quantized_llama("int8_weight_only")
    be = fxfuse.backend(inner="inductor")
    with torch.no_grad():
        expected = torch.compile(model)(TOKENS)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(model, backend=be)(TOKENS), expected)
    assert be.report.removed == 6


def hugging_face_llama(tmp_path, config: str = "int8_weight_only"):
    """A tiny transformers LLaMA quantized on load with TorchAoConfig, from a
    local checkpoint (no download)."""
    transformers = pytest.importorskip("transformers")
    llama = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(llama).to(DTYPE).save_pretrained(tmp_path)
    return transformers.LlamaForCausalLM.from_pretrained(
        tmp_path, dtype=DTYPE, quantization_config=transformers.TorchAoConfig(CONFIGS[config]()),
    ).eval()


def test_fuse_torchao_hugging_face_llama_with_torchao_config(tmp_path):
    model = hugging_face_llama(tmp_path)
    assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "Int8Tensor"
    be = fxfuse.backend(inner="eager")
    with torch.no_grad():
        expected = model(TOKENS).logits
        torch.testing.assert_close(torch.compile(model, backend=be)(TOKENS).logits, expected)
    assert be.report.removed == 6  # q/k/v and gate/up of 2 layers


# ------------------------------------------------------------ refused


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(64, 32, bias=False), nn.Linear(64, 48, bias=False)

    def forward(self, x):
        return self.a(x), self.b(x)


def quantized_pair(config_a, config_b=None) -> Pair:
    model = Pair().to(DTYPE).eval()
    quantization.quantize_(model, config_a, filter_fn=lambda m, name: name == "a")
    quantization.quantize_(model, config_b or config_a, filter_fn=lambda m, name: name == "b")
    return model


def assert_backend_left_alone(fn, args, reason: Reason, calls: int, **options):
    """The graph fxfuse hands on is Dynamo's own, the reason is counted, and
    the results are the unfused ones."""
    seen = []

    def inner(gm, example_inputs):
        seen.append(call_ops(gm))
        return gm.forward

    be = fxfuse.backend(inner=inner, **options)
    with torch.no_grad():
        expected = fn(*args)
        for a, b in zip(torch.compile(fn, backend=be)(*args), expected):
            torch.testing.assert_close(a, b)
        gm, _ = capture_with_inputs(fn, *args)
    assert seen == [call_ops(gm)]
    assert be.report.removed == 0 and be.report.skipped == {reason.value: calls}
    assert torch._dynamo.utils.counters["fxfuse_skipped"][reason.value] == calls


X = torch.randn(3, 64, dtype=DTYPE, generator=torch.Generator().manual_seed(1))


def test_no_fuse_quantized_subclass_mismatch():
    model = quantized_pair(CONFIGS["int8_weight_only"](), CONFIGS["float8_weight_only"]())
    assert_backend_left_alone(model, (X,), Reason.QUANT_SUBCLASS_MISMATCH, 2)


def test_no_fuse_quantization_metadata_mismatch():
    # Both Int8Tensor; only b quantizes its activations.
    model = quantized_pair(CONFIGS["int8_weight_only"](), CONFIGS["int8_dynamic"]())
    assert_backend_left_alone(model, (X,), Reason.QUANT_METADATA_MISMATCH, 2)


def test_no_fuse_quantized_scales_not_per_row():
    # One scale per tensor: a joined tensor would need one scale for both.
    config = quantization.Int8WeightOnlyConfig(granularity=quantization.PerTensor(), set_inductor_config=False)
    model = quantized_pair(config)
    assert model.a.weight.scale.numel() == 1
    assert_backend_left_alone(model, (X,), Reason.QUANT_NOT_PER_ROW, 2)


def test_no_fuse_quantized_and_plain_siblings():
    model = Pair().to(DTYPE).eval()
    quantization.quantize_(model, CONFIGS["int8_weight_only"](), filter_fn=lambda m, name: name == "a")
    assert_backend_left_alone(model, (X,), Reason.QUANT_MISMATCH, 2)


def test_no_fuse_quantized_weights_concatenated_per_call():
    # Weights passed in as arguments: no storage holds them across calls, and
    # torchao has no concatenation of its tensors to run in the graph.
    model = quantized_pair(CONFIGS["int8_weight_only"]())

    def f(x, wa, wb):
        return F.linear(x, wa), F.linear(x, wb)

    args = (X, model.a.weight.detach(), model.b.weight.detach())  # not Parameters: not static
    assert_backend_left_alone(f, args, Reason.QUANT_CONCAT_PER_CALL, 2)


def test_no_fuse_quantized_tensor_subclass_weight_without_storage():
    # weights="cat" asks for an in-graph concatenation, which torchao's tensors lack.
    model = quantized_pair(CONFIGS["int8_weight_only"]())
    assert_backend_left_alone(model, (X,), Reason.QUANTIZED_SUBCLASS, 2, weights="cat")


# ------------------------------------------------------------ Inductor's hooks


class QKV(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = (nn.Linear(64, n, bias=False) for n in (64, 32, 32))

    def forward(self, x):
        return self.q(x), self.k(x), self.v(x)


def test_fuse_torchao_int8_weight_only_in_inductor_hooks_with_freezing():
    # Inside Inductor the subclass is gone: torchao's weight-only int8 linear is
    # mm(x, qdata.t().to(dtype)) * scale, the aten int8 form fxfuse already
    # fuses; with freezing, the int8 weights and scales are concatenated once.
    model = QKV().to(DTYPE).eval()
    quantization.quantize_(model, CONFIGS["int8_weight_only"]())
    # Without oneDNN weight packing, as every freezing test here: Inductor
    # registers its packing patterns once per process, at the first freezing
    # compile that allows it, and keeps them (a later test that turns packing
    # off would still get packed weights, and no GEMM for its hook).
    with torch._inductor.config.patch({"freezing": True, "cpp.weight_prepack": False}), torch.no_grad():
        expected = torch.compile(model)(X)
        torch._dynamo.reset()
        with fxfuse.installed("post_grad_custom_pre_pass") as p:
            out = torch.compile(model)(X)
    assert p.report.removed == 2
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b)


def test_fuse_torchao_fused_weight_has_static_shapes_after_aot():
    # AOTAutograd fakifies the fused weight's inner tensors afresh: they must
    # keep their known sizes, not get symbols (Inductor would emit kernels for
    # any size, and its cache key would not pickle).
    from torch._dynamo.backends.common import aot_autograd

    shapes = []

    def record(gm, example_inputs):
        shapes.extend(tuple(n.meta["val"].shape) for n in gm.graph.find_nodes(op="placeholder"))
        return gm.forward

    model = QKV().to(DTYPE).eval()
    quantization.quantize_(model, CONFIGS["float8_weight_only"]())
    be = fxfuse.backend(inner=aot_autograd(fw_compiler=record))
    with torch.no_grad():
        for a, b in zip(torch.compile(model, backend=be)(X), model(X)):
            torch.testing.assert_close(a, b)
    assert be.report.removed == 2
    assert (128, 64) in shapes and (128, 1) in shapes  # the fused qdata and scale
    assert all(isinstance(d, int) for s in shapes for d in s), shapes


def test_fuse_torchao_failed_rewrite_gives_inner_tensors_their_memory_back(monkeypatch):
    # A rewrite that fails after the storage was made: each inner tensor owns
    # its memory again, and the graph runs unfused.
    from fxfuse.weights import _REGISTRY
    from test_faults import raise_at

    model = QKV().to(DTYPE).eval()
    quantization.quantize_(model, CONFIGS["int8_weight_only"]())
    raise_at(monkeypatch, "erase", 1)
    be = fxfuse.backend(inner="eager")
    with torch.no_grad():
        for a, b in zip(torch.compile(model, backend=be)(X), model(X)):
            torch.testing.assert_close(a, b)
    assert be.report.removed == 0 and be.report.skipped == {Reason.ERROR.value: 3}
    inner = [getattr(w, k) for w in (model.q.weight, model.k.weight, model.v.weight) for k in ("qdata", "scale")]
    assert not any(_REGISTRY.get(t) is not None for t in inner)
    assert len({t.untyped_storage().data_ptr() for t in inner}) == len(inner)
