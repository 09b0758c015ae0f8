"""`fxfuse.guard_filter`: Dynamo's two Python guards on each torchao weight
the backend took over are left out, and nothing else (guards.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxfuse

from test_torchao import TOKENS, hugging_face_llama, quantized_llama

quantization = pytest.importorskip("torchao.quantization")

METADATA, NAMES = "TENSOR_SUBCLASS_METADATA_MATCH", "EQUALS_MATCH"


class Spy:
    """A guard filter that asks `inner` and keeps what it answered."""

    def __init__(self, inner) -> None:
        self.inner, self.seen = inner, []

    def __call__(self, entries):
        keep = self.inner(entries)
        self.seen += [(e.guard_type, e.name, k) for e, k in zip(entries, keep)]
        return keep

    def dropped(self) -> set:
        return {(kind, name) for kind, name, k in self.seen if not k}

    def kept(self, kind: str) -> set:
        return {name for t, name, k in self.seen if k and t == kind}


def weight_name(module: str) -> str:
    """How Dynamo names the weight of a submodule of the compiled Transformer."""
    path = "".join(f"._modules['{p}']" for p in module.split("."))
    return f"self{path}._parameters['weight']"


def compile_with(model, spy, backend=None):
    torch._dynamo.reset()
    return torch.compile(model, backend=backend or fxfuse.backend(inner="eager"), options={"guard_filter_fn": spy})


MEMBERS = [f"layers.{i}.{m}" for i in range(2) for m in
           ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")]


def test_guard_filter_skips_the_python_guards_of_each_fused_quantized_weight():
    from torch._dynamo.utils import counters

    model = quantized_llama("int8_weight_only")
    counters.clear()
    spy = Spy(fxfuse.guard_filter)
    with torch.no_grad():
        expected = model(TOKENS)
        torch.testing.assert_close(compile_with(model, spy)(TOKENS), expected)
    members = {weight_name(m) for m in MEMBERS}
    assert spy.dropped() == ({(METADATA, w) for w in members}
                             | {(NAMES, f"{w}.__tensor_flatten__()[0]") for w in members})
    assert counters["fxfuse"]["python_guards_skipped"] == 20
    # The weights the graph reads itself (wo, w2, output) keep theirs; every
    # member keeps its C++ guards, its own and its inner tensors'.
    assert spy.kept(METADATA) == {weight_name(m) for m in
                                  ("layers.0.attention.wo", "layers.1.attention.wo", "layers.0.feed_forward.w2",
                                   "layers.1.feed_forward.w2", "output")}
    assert members | {f"{w}.qdata" for w in members} <= spy.kept("TENSOR_MATCH")


def test_guard_filter_leaves_every_guard_without_the_fxfuse_backend():
    spy = Spy(fxfuse.guard_filter)
    model = quantized_llama("int8_weight_only")
    with torch.no_grad():
        compile_with(model, spy, backend="eager")(TOKENS)
    assert spy.seen and not spy.dropped()


class ReadAgain(nn.Module):
    """wq and wk fused before a graph break; after it, wq is read itself."""

    def __init__(self) -> None:
        super().__init__()
        self.wq = nn.Linear(64, 64, bias=False)
        self.wk = nn.Linear(64, 64, bias=False)

    def forward(self, x):
        y = self.wq(x) * self.wk(x)
        torch._dynamo.graph_break()
        return F.linear(y, self.wq.weight)


def test_guard_filter_keeps_the_guards_of_a_weight_the_compiled_code_reads():
    torch.manual_seed(0)
    model = ReadAgain().to(torch.bfloat16).eval()
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig(set_inductor_config=False))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    calls = []

    def spy(entries):
        keep = fxfuse.guard_filter(entries)
        calls.append(({e.name for e, k in zip(entries, keep) if not k},
                      {e.name for e, k in zip(entries, keep) if k and e.guard_type == METADATA}))
        return keep

    with torch.no_grad():
        torch.testing.assert_close(compile_with(model, spy)(x), model(x))
    # Two compiles: the frame up to the break, then the code after it, each
    # with its own guards. The first graph reads neither weight, the second wq.
    (first_dropped, _), (second_dropped, second_kept) = calls
    assert {n for n in first_dropped if n.endswith("._parameters['weight']")} == {
        "self._modules['wq']._parameters['weight']", "self._modules['wk']._parameters['weight']"}
    assert not second_dropped and any("_modules['wq']._parameters['weight']" in n for n in second_kept)


def test_guard_filter_keeps_a_taken_weight_another_graph_of_the_compile_reads():
    # One compile, two graphs: one took the weight over, the other reads it.
    from torch._guards import CompileContext, CompileId, compile_context
    from torch._dynamo.types import GuardFilterEntry

    from fxfuse.guards import COMPILE

    w = quantized_llama("int8_weight_only").layers[0].attention.wq.weight

    def entries():
        return [GuardFilterEntry(name="w", has_value=True, value=w, guard_type=METADATA, derived_guard_types=(),
                                 is_global=False, orig_guard=None),
                GuardFilterEntry(name="w.__tensor_flatten__()[0]", has_value=True, value=["qdata"],
                                 guard_type=NAMES, derived_guard_types=(), is_global=False, orig_guard=None)]

    with compile_context(CompileContext(CompileId(frame_id=900, frame_compile_id=0))):
        COMPILE.took([w])
        assert fxfuse.guard_filter(entries()) == [False, False]
        COMPILE.reads([w])
        assert fxfuse.guard_filter(entries()) == [True, True]
    with compile_context(CompileContext(CompileId(frame_id=900, frame_compile_id=1))):
        assert fxfuse.guard_filter(entries()) == [True, True]  # another compile took nothing


def dynamic_int8_like(weight) -> nn.Parameter:
    """A weight of the same shapes as an int8 weight-only one whose metadata
    says: quantize the activations too (another result)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False).to(torch.bfloat16)
    quantization.quantize_(linear, quantization.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
    return linear.weight


FILTERS = {
    "dynamo_guards": lambda entries: [True] * len(entries),
    "guard_filter": fxfuse.guard_filter,
    "all_module_guards_skipped": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
}


@pytest.mark.parametrize("name", list(FILTERS))
def test_replaced_weight_with_other_quantization_never_runs_the_old_graph(name):
    # Without the check, the filtered runs returned the weight-only result
    # (0.008 off the eager output, whose largest value is 2).
    filtered = name != "dynamo_guards"
    model = quantized_llama("int8_weight_only")
    fn = compile_with(model, FILTERS[name])
    with torch.no_grad():
        fn(TOKENS)
        wk = model.layers[0].attention.wk
        wk.weight = dynamic_int8_like(wk.weight)
        expected = model(TOKENS)
        if not filtered:  # Dynamo's metadata guard fails: it recompiles
            torch.testing.assert_close(fn(TOKENS), expected)
        else:  # not checked by Dynamo any more: fxfuse's own check refuses the old graph
            with pytest.raises(fxfuse.QuantizedWeightChanged, match="other quantization metadata"):
                fn(TOKENS)


def test_guard_filter_new_weights_of_the_same_quantization_are_picked_up():
    model = quantized_llama("float8_weight_only")
    fn = compile_with(model, fxfuse.guard_filter)
    other = quantized_llama("float8_weight_only", seed=1)
    with torch.no_grad():
        fn(TOKENS)
        model.load_state_dict(other.state_dict(), assign=True)  # new tensor objects, same metadata
        torch.testing.assert_close(fn(TOKENS), other(TOKENS))
        model.layers[1].feed_forward.w3.weight.scale.mul_(2)  # in place
        torch.testing.assert_close(fn(TOKENS), model(TOKENS))


def test_guard_filter_with_the_backend_by_name():
    # torch.compile takes the filter out of `options`; fxfuse gets the rest.
    from torch._dynamo.utils import counters

    model = quantized_llama("int8_weight_only")
    torch._dynamo.reset()
    counters.clear()
    spy = Spy(fxfuse.guard_filter)
    fn = torch.compile(model, backend="fxfuse", options={"inner": "eager", "guard_filter_fn": spy})
    with torch.no_grad():
        torch.testing.assert_close(fn(TOKENS), model(TOKENS))
    assert counters["fxfuse"]["linear_calls_removed"] == 6 and counters["fxfuse"]["python_guards_skipped"] == 20
    assert {name for kind, name in spy.dropped() if kind == METADATA} == {weight_name(m) for m in MEMBERS}


def test_guard_filter_in_hugging_face_generate_with_torchao_config(tmp_path):
    # A transformers model quantized on load (TorchAoConfig), decoding through
    # generate()'s CompileConfig: the filter travels in `options` (then no
    # `mode`: torch.compile takes one or the other).
    from torch._dynamo.utils import counters

    model = hugging_face_llama(tmp_path)
    from transformers.generation import CompileConfig

    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    expected = model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static")
    torch._dynamo.reset()
    counters.clear()
    be = fxfuse.backend(inner="eager")
    compile_config = CompileConfig(backend=be, mode=None, options={"guard_filter_fn": fxfuse.guard_filter})
    compile_config._compile_all_devices = True  # transformers compiles on GPUs only otherwise
    out = model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static",
                         compile_config=compile_config)
    torch.testing.assert_close(out, expected)
    assert be.report.removed == 6  # q/k/v and gate/up of 2 layers, in the decode step
    assert counters["fxfuse"]["python_guards_skipped"] == 20
