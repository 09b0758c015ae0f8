"""fuse_exported: torch.export programs with sibling linears fused."""

from __future__ import annotations

import io

import pytest
import torch

import fxfuse
from fxfuse.models import LlamaConfig, Transformer

TOKENS = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(0))


def gemms(ep) -> int:
    ops = (torch.ops.aten.linear.default, torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
    return sum(1 for n in ep.graph.nodes if n.target in ops)


@pytest.fixture(scope="module")
def exported():
    torch.manual_seed(0)
    model = Transformer(LlamaConfig(n_layer=3, q_bias=True)).eval()
    return model, torch.export.export(model, (TOKENS,))


def test_fuse_exported_removes_6_per_2_layers_and_matches(exported):
    model, ep = exported
    before = gemms(ep)
    fused = fxfuse.fuse_exported(ep)
    assert gemms(ep) == before, "the input program is left as it was"
    assert before - gemms(fused) == 9 and fused.fxfuse_report.removed == 9
    fused.validate()
    with torch.no_grad():
        torch.testing.assert_close(fused.module()(TOKENS), model(TOKENS))


def test_fuse_exported_weights_are_parameters_without_a_second_copy(exported):
    _, ep = exported
    fused = fxfuse.fuse_exported(ep)
    names = {s.target for s in fused.graph_signature.input_specs if s.kind.name == "PARAMETER"}
    assert "fxfuse.fused_0.weight" in names and "fxfuse.fused_0.bias" in names
    assert "layers.0.attention.wq.weight" not in fused.state_dict
    assert fused.state_dict["fxfuse.fused_0.weight"].shape == (128, 64)  # q 64 + k 32 + v 32 rows
    size = lambda sd: sum(t.numel() * t.element_size() for t in sd.values())  # noqa: E731
    zero_rows = 3 * 2 * 32 * 4  # k and v have no bias: their zero rows in the fused bias, fp32
    assert size(fused.state_dict) == size(ep.state_dict) + zero_rows


def test_fuse_exported_round_trips_through_save_and_load(exported):
    model, ep = exported
    buf = io.BytesIO()
    torch.export.save(fxfuse.fuse_exported(ep), buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    assert gemms(ep) - gemms(loaded) == 9
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(TOKENS), model(TOKENS))


def test_fuse_exported_compiles_with_aoti(exported, tmp_path):
    model, ep = exported
    path = torch._inductor.aoti_compile_and_package(fxfuse.fuse_exported(ep), package_path=str(tmp_path / "m.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        torch.testing.assert_close(runner(TOKENS), model(TOKENS))


class QKVOut(torch.nn.Module):
    """Members' outputs are the program's outputs themselves."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(16, n) for n in (16, 8, 8))

    def forward(self, x):
        return self.q(x), self.k(x), self.v(x)


def test_fuse_exported_member_outputs_returned_from_the_program():
    torch.manual_seed(0)
    model, x = QKVOut().eval(), torch.randn(3, 16)
    fused = fxfuse.fuse_exported(torch.export.export(model, (x,)))
    assert fused.fxfuse_report.removed == 2
    fused.validate()
    out_names = [s.arg.name for s in fused.graph_signature.output_specs]
    assert out_names == [a.name for a in fused.graph.output_node().args[0]]
    with torch.no_grad():
        for a, b in zip(fused.module()(x), model(x)):
            torch.testing.assert_close(a, b)


def test_fuse_exported_int8_weights_are_parameters():
    from fxfuse.models import quantize_int8

    torch.manual_seed(0)
    model = quantize_int8(Transformer(LlamaConfig(n_layer=2))).eval()
    ep = torch.export.export(model, (TOKENS,))
    fused = fxfuse.fuse_exported(ep)
    assert fused.fxfuse_report.removed == 6
    assert {g.weights for g in fused.fxfuse_report.groups} == {"storage"}
    # No second copy: the members' int8 weights and scales left the state dict.
    size = lambda e: sum(t.numel() * t.element_size() for t in e.state_dict.values())  # noqa: E731
    assert size(fused) == size(ep)
    fused.validate()
    with torch.no_grad():
        torch.testing.assert_close(fused.module()(TOKENS), model(TOKENS), rtol=1e-4, atol=1e-4)
