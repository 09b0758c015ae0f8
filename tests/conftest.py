"""Shared helpers: capture Dynamo graphs, describe graphs structurally."""

from __future__ import annotations

import logging
import operator

import pytest
import torch
from torch import fx


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def capture_with_inputs(fn, *args, dynamic=False) -> tuple[fx.GraphModule, list]:
    """The one graph Dynamo hands a backend for `fn(*args)`, and its real inputs."""
    graphs: list = []

    def record(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch.compile(fn, backend=record, fullgraph=True, dynamic=dynamic)(*args)
    torch._dynamo.reset()
    assert len(graphs) == 1
    return graphs[0]


def capture(fn, *args, dynamic=False) -> fx.GraphModule:
    return capture_with_inputs(fn, *args, dynamic=dynamic)[0]


def call_ops(gm: fx.GraphModule) -> list[str]:
    """Call nodes as short names, in graph order: a structural view of a graph."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function":
            name = "getitem" if n.target is operator.getitem else getattr(n.target, "__name__", str(n.target))
            out.append(name)
        elif n.op == "call_method":
            out.append("." + str(n.target))
        elif n.op == "call_module":
            out.append(f"module:{type(gm.get_submodule(n.target)).__name__}")
    return out


def n_linear(gm: fx.GraphModule) -> int:
    from fxfuse.match import count_linears

    return count_linears(gm)


class _DropTorchaoNoise(logging.Filter):
    """torchao (in the test extra) warns on import that it cannot load its CUDA
    kernels ("Failed to load ... .so") on a CPU-only machine, and registers
    enums that torch calls deprecated: harmless here, and noise in every
    test report."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Failed to load") or "is an Enum subclass" in message)


for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).addFilter(_DropTorchaoNoise())


def fuse_and_compare(gm: fx.GraphModule, inputs: list, config=None):
    """fuse_linears on a captured graph, its outputs equal before and after; the report."""
    import fxfuse

    with torch.no_grad():
        expected = gm(*inputs)
    report = fxfuse.fuse_linears(gm, config)
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), expected)
    return report
