"""A failure at any step of the rewrite leaves the graph exactly as it was.

Each named step (transaction.STEPS) is made to raise in turn, in the first
group and in the last one (after others were rewritten): the graph's code
must be byte-identical to before, lint clean, and its outputs equal eager.
"""

from __future__ import annotations

import pytest
import torch

import fxfuse
import fxfuse.transaction as transaction
from fxfuse import FuseConfig
from fxfuse.legality import Reason

from conftest import capture_with_inputs
from test_chain import ThreeDeep, _model


class Injected(RuntimeError):
    pass


def raise_at(monkeypatch, step: str, nth: int) -> None:
    count = [0]

    def checkpoint(s: str) -> None:
        if s == step:
            count[0] += 1
            if count[0] == nth:
                raise Injected(f"fault at {step} #{nth}")

    monkeypatch.setattr(transaction, "checkpoint", checkpoint)


def hits(monkeypatch, step: str, run) -> int:
    """How many times one rewrite passes `step`."""
    seen: list[str] = []
    monkeypatch.setattr(transaction, "checkpoint", lambda s: seen.append(s) if s == step else None)
    run()
    return len(seen)


X = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("which", ["first", "last"])
@pytest.mark.parametrize("step", transaction.STEPS)
def test_fault_in_fuse_linears_leaves_graph_unchanged(step, which, monkeypatch):
    model = _model(ThreeDeep)
    gm, inputs = capture_with_inputs(model, X)
    n = hits(monkeypatch, step, lambda: fxfuse.fuse_linears(capture_with_inputs(model, X)[0]))
    assert n >= 1, f"step {step} never reached"
    raise_at(monkeypatch, step, 1 if which == "first" else n)
    code = gm.code
    report = fxfuse.fuse_linears(gm)
    assert report.removed == 0 and report.skipped[Reason.ERROR.value] == 7
    assert "Injected" in report.errors[0]
    gm.graph.lint()
    assert gm.code == code
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(X))


@pytest.mark.parametrize("step", transaction.STEPS)
def test_fault_in_backend_compiles_dynamo_graph_unchanged(step, monkeypatch):
    """Storage mode: the fused placeholders and the storage bookkeeping go too."""
    model = _model(ThreeDeep)
    codes: list[str] = []

    def inner(gm, example_inputs):
        codes.append(gm.code)
        return gm.forward

    with torch.no_grad():
        ref = model(X)
        torch.compile(model, backend=fxfuse.backend(inner=inner, min_group_size=9))(X)  # nothing fused
        torch._dynamo.reset()
        raise_at(monkeypatch, step, 1)
        be = fxfuse.backend(inner=inner)
        out = torch.compile(model, backend=be)(X)
    torch.testing.assert_close(out, ref)
    assert be.report.removed == 0 and be.report.errors
    assert codes[1] == codes[0]


@pytest.fixture(scope="module")
def exported():
    model = _model(ThreeDeep)
    return model, torch.export.export(model, (X,))


@pytest.mark.parametrize("step", transaction.STEPS)
def test_fault_in_fuse_exported_leaves_program_unchanged(step, exported, monkeypatch):
    """Aten dialect; the new parameters and signature entries go too."""
    model, ep = exported
    raise_at(monkeypatch, step, 1)
    fused = fxfuse.fuse_exported(ep)
    assert fused.fxfuse_report.removed == 0 and fused.fxfuse_report.errors
    assert fused.graph_module.code == ep.graph_module.code
    assert list(fused.graph_signature.input_specs) == list(ep.graph_signature.input_specs)
    assert fused.state_dict.keys() == ep.state_dict.keys()
    torch.testing.assert_close(fused.module()(X), model(X))


def test_fault_in_inductor_hook_compiles_unfused(monkeypatch):
    model = _model(ThreeDeep)
    raise_at(monkeypatch, "reroute", 2)
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        with fxfuse.installed("post_grad_custom_pre_pass") as p:
            out = torch.compile(model)(X)
        torch.testing.assert_close(out, model(X))
    assert p.report.removed == 0 and p.report.errors


def test_strict_reraises_after_undoing(monkeypatch):
    model = _model(ThreeDeep)
    gm, _ = capture_with_inputs(model, X)
    code = gm.code
    raise_at(monkeypatch, "split", 2)
    with pytest.raises(Injected):
        fxfuse.fuse_linears(gm, FuseConfig(strict=True))
    assert gm.code == code


@pytest.mark.parametrize("step", ["reroute", "erase"])
def test_fault_gives_weights_their_own_memory_back(step, monkeypatch):
    """A storage made by the failed rewrite is released: each member owns its
    memory again, as before the compile (no fused tensor left behind)."""
    from fxfuse.weights import _REGISTRY

    model = _model(ThreeDeep)
    raise_at(monkeypatch, step, 1)
    with torch.no_grad():
        torch.compile(model, backend=fxfuse.backend(inner="eager"))(X)
    params = list(model.parameters())
    assert not any(_REGISTRY.get(p) is not None for p in params)
    assert len({p.untyped_storage().data_ptr() for p in params}) == len(params)


def fails_on_fused_graphs(gm, example_inputs):
    """An inner compiler that rejects any graph fxfuse gave fused inputs."""
    if any(str(n.target).startswith("fxfuse_fused") for n in gm.graph.find_nodes(op="placeholder")):
        raise Injected("inner compiler: no fused graphs")
    return gm.forward


def test_inner_compiler_failure_gives_weights_their_own_memory_back():
    """The inner compiler rejects the fused graph: Dynamo's own graph is
    compiled instead, with each weight back in its own memory, as Dynamo saw
    it when it traced (a storage view would not match its fake tensors)."""
    from fxfuse.weights import _REGISTRY

    model = _model(ThreeDeep)
    with torch.no_grad():
        expected = model(X)
        be = fxfuse.backend(inner=fails_on_fused_graphs)
        out = torch.compile(model, backend=be)(X)
    torch.testing.assert_close(out, expected)
    assert be.report.errors and be.report.skipped[Reason.ERROR.value] > 0
    assert be.report.removed == 0
    params = list(model.parameters())
    assert not any(_REGISTRY.get(p) is not None for p in params)
    assert len({p.untyped_storage().data_ptr() for p in params}) == len(params)


def test_fault_after_the_rewrite_gives_weights_their_own_memory_back(monkeypatch):
    """A failure after the rewrite succeeded (here: dropping the unread
    placeholders) compiles Dynamo's graph unchanged, weights in their own memory."""
    from fxfuse.inputs import FusedInputs
    from fxfuse.weights import _REGISTRY

    def prune(self):
        raise Injected("fault in prune")

    monkeypatch.setattr(FusedInputs, "prune", prune)
    model = _model(ThreeDeep)
    be = fxfuse.backend(inner="eager")
    with torch.no_grad():
        expected = model(X)
        torch.testing.assert_close(torch.compile(model, backend=be)(X), expected)
    assert be.report.errors and be.report.removed == 0
    params = list(model.parameters())
    assert not any(_REGISTRY.get(p) is not None for p in params)
    assert len({p.untyped_storage().data_ptr() for p in params}) == len(params)
