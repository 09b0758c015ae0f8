"""The torch.compile backend: options, inner compilers, numerics, failures."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import torch

import fxfuse
from fxfuse.models import LlamaConfig, Transformer

CFG = LlamaConfig(n_layer=2, q_bias=True)  # grouped KV heads, a bias on q only


def llama(seed=0):
    torch.manual_seed(seed)
    return Transformer(CFG)


def tokens(seed=1, b=2, s=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab, (b, s), generator=g)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_backend_matches_eager_no_grad(inner):
    model, t = llama(), tokens()
    be = fxfuse.backend(inner=inner)
    with torch.no_grad():
        ref = model(t)
        out = torch.compile(model, backend=be)(t)
    torch.testing.assert_close(out, ref)
    assert be.report.removed == 6 and (be.report.before, be.report.after) == (15, 9)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_backend_gradients_match_eager(inner):
    model, t = llama(), tokens()
    twin = llama()
    be = fxfuse.backend(inner=inner, training=True)
    out = torch.compile(model, backend=be)(t)
    ref = twin(t)
    torch.testing.assert_close(out, ref)
    out.square().mean().backward()
    ref.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert be.report.removed == 6


def test_backend_dynamic_shapes():
    model = llama()
    be = fxfuse.backend(inner="eager")
    compiled = torch.compile(model, backend=be, dynamic=True)
    with torch.no_grad():
        for s in (3, 5, 9):
            t = tokens(s=s)
            torch.testing.assert_close(compiled(t), model(t))
    assert be.report.graphs <= 2 and be.report.removed == 6 * be.report.graphs and not be.report.skipped


def test_backend_options_through_torch_compile():
    model, t = llama(), tokens()
    with torch.no_grad():
        torch.compile(model, backend="fxfuse", options={"inner": "eager", "min_group_size": 3})(t)
    counters = torch._dynamo.utils.counters
    # Only q/k/v (3 members) pass min_group_size=3; gate/up (2) are counted as skipped.
    assert counters["fxfuse"]["linear_calls_removed"] == 4
    assert counters["fxfuse_skipped"]["below_min_group_size"] == 4


def test_backend_unknown_option_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown fxfuse option 'min_grup_size' \(did you mean 'min_group_size'\?\)"):
        fxfuse.backend(min_grup_size=3)
    with pytest.raises(ValueError, match="known options are: inner, mode, inner_options, min_group_size, "):
        fxfuse.backend(innr="eager")
    with pytest.raises(ValueError, match="min_group_size must be an int >= 2, got 1"):
        fxfuse.backend(min_group_size=1)


def test_backend_inner_callable_and_named():
    seen = []

    def inner(gm, example_inputs):
        seen.append(gm)
        return gm.forward

    model, t = llama(), tokens()
    with torch.no_grad():
        torch.compile(model, backend=fxfuse.backend(inner=inner))(t)
        torch._dynamo.reset()
        out = torch.compile(model, backend=fxfuse.backend(inner="aot_eager"))(t)
        torch.testing.assert_close(out, model(t))
    assert len(seen) == 1 and "split" in seen[0].code


def test_backend_survives_a_failing_pass(monkeypatch, caplog):
    fb = sys.modules["fxfuse.backend"]  # the module; fxfuse.backend is the function

    def broken(gm, config, inputs=None, runs_with_grad=False):
        raise RuntimeError("pass bug")

    monkeypatch.setattr(fb, "_fuse", broken)
    model, t = llama(), tokens()
    be = fxfuse.backend(inner="eager")
    with caplog.at_level(logging.WARNING, logger="fxfuse"), torch.no_grad():
        out = torch.compile(model, backend=be)(t)
        torch.testing.assert_close(out, model(t))
    assert "pass bug" in caplog.text and be.report.removed == 0 and be.report.errors
    torch._dynamo.reset()
    with pytest.raises(Exception, match="pass bug"), torch.no_grad():
        torch.compile(model, backend=fxfuse.backend(inner="eager", strict=True))(t)


def test_backend_string_works_without_importing_fxfuse():
    code = textwrap.dedent(
        """
        import sys, torch
        from fxfuse.models import LlamaConfig, Transformer  # the model only
        del sys.modules["fxfuse"]; [sys.modules.pop(k) for k in list(sys.modules) if k.startswith("fxfuse.")]
        m = Transformer(LlamaConfig(n_layer=1))
        t = torch.randint(0, 128, (1, 4))
        with torch.no_grad():
            out = torch.compile(m, backend="fxfuse", options={"inner": "eager"})(t)
            torch.testing.assert_close(out, m(t))
        print("removed", torch._dynamo.utils.counters["fxfuse"]["linear_calls_removed"])
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "removed 3" in res.stdout


def test_import_has_no_side_effects():
    code = (
        "import torch._dynamo.backends.registry as r, torch._inductor.config as c;"
        "before = (dict(r._COMPILER_FNS), c.get_config_copy());"
        "import fxfuse;"
        "after = (dict(r._COMPILER_FNS), c.get_config_copy());"
        "assert before[0].keys() == after[0].keys(), 'registered a backend at import';"
        "assert before[1] == after[1], 'changed inductor config at import'"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr


def test_backend_storage_path_survives_a_failing_rewrite(monkeypatch):
    # The rewrite fails after the fused weights became graph inputs: the undo
    # must drop them too, and the compile must go on with the untouched graph.
    import fxfuse.rewrite

    monkeypatch.setattr(fxfuse.rewrite, "_set_values", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    model, t = llama(), tokens()
    be = fxfuse.backend(inner="eager")
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=be)(t), model(t))
    assert be.report.removed == 0 and "boom" in be.report.errors[0]


def test_backend_survives_an_inner_compiler_that_rejects_the_fused_graph(caplog):
    # An inner compiler that fails on any fused graph (as Inductor's int8
    # lowering once did on CUDA): the graph is compiled unfused instead.
    from torch._dynamo.backends.debugging import eager
    from fxfuse.match import count_linears

    def picky(gm, example_inputs):
        if count_linears(gm) < 15:  # 2 layers x 7 linears and the head: anything fused
            raise RuntimeError("inner rejects fused graph")
        return eager(gm, example_inputs)

    model, t = llama(), tokens()
    be = fxfuse.backend(inner=picky)
    with caplog.at_level(logging.WARNING, logger="fxfuse"), torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=be)(t), model(t))
    assert "inner rejects fused graph" in caplog.text
    assert be.report.removed == 0 and be.report.skipped["error_in_pass"] == 10
    torch._dynamo.reset()
    with pytest.raises(Exception, match="inner rejects fused graph"), torch.no_grad():
        torch.compile(model, backend=fxfuse.backend(inner=picky, strict=True))(t)


def test_backend_inner_failure_of_its_own_is_not_hidden():
    # Nothing was fused: the inner compiler's error is the user's to see.
    def broken(gm, example_inputs):
        raise RuntimeError("inner compiler bug")

    with pytest.raises(Exception, match="inner compiler bug"), torch.no_grad():
        torch.compile(lambda x: x.sin(), backend=fxfuse.backend(inner=broken))(torch.randn(3))


@pytest.mark.parametrize("options, message", [
    ({"innr": "eager"}, r"unknown fxfuse option 'innr' \(did you mean 'inner'\?\); known options are: inner, mode, "),
    ({"min_group_size": 1}, "min_group_size must be an int >= 2, got 1"),
], ids=["unknown", "bad_value"])
def test_backend_option_error_through_torch_compile_is_short(options, message):
    # Raised at the first compile, the first time fxfuse sees the options, as the
    # error itself (not Dynamo's BackendCompilerFailed) and without Dynamo's frames.
    model = torch.nn.Linear(4, 4)
    with pytest.raises(fxfuse.OptionError, match=message) as info:
        torch.compile(model, backend="fxfuse", options=options)(torch.randn(2, 4))
    assert len(str(info.value).splitlines()) <= 3  # Dynamo adds a TORCHDYNAMO_VERBOSE hint
    files = [str(f.path) for f in info.traceback]
    assert not any("output_graph.py" in f or "after_dynamo.py" in f for f in files), files


def test_backend_survives_deepcopy():
    # transformers deep-copies its CompileConfig, backend included, on every generate().
    import copy

    be = fxfuse.backend(inner="eager")
    model, t = llama(), tokens()
    with torch.no_grad():
        torch.compile(model, backend=copy.deepcopy({"backend": be})["backend"])(t)
    assert copy.deepcopy(be) is be and be.report.removed == 6


def test_backend_takes_the_mode_torch_compile_passes(caplog):
    x = torch.randn(2, 4)
    model = torch.nn.Linear(4, 4)
    named = fxfuse.backend(inner="eager")
    torch.testing.assert_close(torch.compile(model, backend=named, mode="max-autotune")(x), model(x))
    assert "max-autotune" in named._by_mode  # reached the named inner backend
    torch._dynamo.reset()
    own = fxfuse.backend(inner=lambda gm, example_inputs: gm.forward)
    with caplog.at_level(logging.WARNING, logger="fxfuse.backend"):
        torch.compile(model, backend=own, mode="max-autotune")(x)
    assert "mode='max-autotune' applies to a named inner backend" in caplog.text
