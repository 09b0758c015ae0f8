"""Tensor-parallel (DTensor) models: each rank fuses its local sibling GEMMs.

Two CPU processes with the gloo backend run every check once (the fixture
`ranks`); the tests read what each rank recorded. The model is two blocks of
q/k/v/o (grouped k/v, a bias on q) and w1/w3/w2, sharded with
``ColwiseParallel`` on q/k/v/w1/w3 and ``RowwiseParallel`` on o/w2.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch built without distributed/gloo", allow_module_level=True)

WORLD = 2
LAYERS = 2
DIM = 32


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wq = nn.Linear(DIM, DIM)
        self.wk = nn.Linear(DIM, DIM // 2, bias=False)
        self.wv = nn.Linear(DIM, DIM // 2, bias=False)
        self.wo = nn.Linear(DIM, DIM, bias=False)
        self.w1 = nn.Linear(DIM, 2 * DIM, bias=False)
        self.w3 = nn.Linear(DIM, 2 * DIM, bias=False)
        self.w2 = nn.Linear(2 * DIM, DIM, bias=False)

    def forward(self, x):
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        h = x + self.wo(q * torch.cat([k, v], -1).sigmoid())
        return h + self.w2(F.silu(self.w1(h)) * self.w3(h))


def tp_model(mesh):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    model = nn.Sequential(*[Block() for _ in range(LAYERS)])
    col, row = ColwiseParallel(), RowwiseParallel()
    plan = {f"{i}.{n}": col for i in range(LAYERS) for n in ("wq", "wk", "wv", "w1", "w3")}
    plan.update({f"{i}.{n}": row for i in range(LAYERS) for n in ("wo", "w2")})
    return parallelize_module(model, mesh, plan)


def _forward_graph_counts(record: dict):
    """An inner compiler that records the aten forward graph's GEMM and
    collective counts (AOTAutograd has turned DTensor into local ops and
    explicit collectives by then)."""
    from torch._dynamo.backends.common import aot_autograd

    def fw(gm, _):
        targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        record["gemms"] = sum(t in ("aten.mm.default", "aten.addmm.default") for t in targets)
        record["collectives"] = sum(t.startswith("_c10d_functional.") and "wait" not in t for t in targets)
        return gm.forward

    return aot_autograd(fw_compiler=fw)


def _structure(gm) -> list:
    """The graph with node names replaced by positions: what it computes.
    Functions by name: older Dynamo makes a new closure per trace for the
    DTensor calls."""
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    return [(n.op, getattr(n.target, "__name__", str(n.target)) if n.op != "placeholder" else "",
             repr(torch.fx.map_arg((n.args, n.kwargs), lambda a: pos[a]))) for n in gm.graph.nodes]


def _old_spelling(gm, example_inputs) -> None:
    """Rewrite the DTensor calls the way older Dynamo versions write them:
    functions named ``prim from_local`` / ``prim_redistribute`` /
    ``prim_to_local`` with the non-tensor arguments (the mesh) baked in."""
    real = dict(zip(gm.graph.find_nodes(op="placeholder"), example_inputs))
    for n in list(gm.graph.nodes):
        if n.op == "call_method" and n.target in ("redistribute", "to_local"):
            fn = (lambda m, kw: lambda t: getattr(t, m)(**kw))(n.target, dict(n.kwargs))
            fn.__name__ = f"prim_{n.target}"
        elif n.op == "call_function" and getattr(n.target, "__name__", "") == "from_local":
            rest = [real.get(a, a) for a in n.args[1:]]
            fn = (lambda f, rest, kw: lambda t: f(t, *rest, **kw))(n.target, rest, dict(n.kwargs))
            fn.__name__ = "prim from_local"
        else:
            continue
        with gm.graph.inserting_before(n):
            new = gm.graph.call_function(fn, (n.args[0],))
        new.meta = n.meta
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
    gm.recompile()


def _diff(a, b) -> float:
    return (a - b).abs().max().item()


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        _checks(rank, out)
    finally:
        dist.destroy_process_group()


def _checks(rank: int, out: str) -> None:
    import fxfuse
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (WORLD,))
    model = tp_model(mesh)
    x = torch.randn(2, 3, DIM, generator=torch.Generator().manual_seed(1))
    r: dict = {}
    with torch.no_grad():
        ref = model(x)
        unfused: dict = {}
        y0 = torch.compile(model, backend=_forward_graph_counts(unfused))(x)
        torch._dynamo.reset()
        fused: dict = {}
        be = fxfuse.backend(inner=_forward_graph_counts(fused), strict=True)
        y1 = torch.compile(model, backend=be)(x)
        r.update(unfused=unfused, fused=fused, removed=be.report.removed,
                 widths=[list(g.widths) for g in be.report.groups],
                 weights=sorted({g.weights for g in be.report.groups}),
                 diff_unfused=_diff(y1, y0), diff_eager=_diff(y1, ref))
        att = model[0]
        local = [att.wq.weight, att.wk.weight, att.wv.weight]
        r["one_storage"] = len({t.to_local().untyped_storage().data_ptr() for t in local}) == 1
        r["stays_dtensor"] = type(att.wq.weight).__name__
        # Never stale: in-place edits of a local shard and a state_dict load.
        att.wk.weight.mul_(-2)
        model[1].w3.weight.to_local().add_(0.5)
        r["diff_after_inplace"] = _diff(torch.compile(model, backend=be)(x), model(x))
        model.load_state_dict({k: v.detach() * 0.5 for k, v in model.state_dict().items()})
        r["diff_after_load"] = _diff(torch.compile(model, backend=be)(x), model(x))
        torch._dynamo.reset()
        # Refused (groups capped below 2): the graph is the one Dynamo built.
        graphs: list = []
        be2 = fxfuse.backend(inner=lambda gm, ex: graphs.append(_structure(gm)) or gm.forward, min_group_size=4)
        torch.compile(model, backend=be2)(x)
        torch._dynamo.reset()
        orig: list = []
        torch.compile(model, backend=lambda gm, ex: orig.append(_structure(gm)) or gm.forward)(x)
        r.update(refused_unchanged=graphs == orig and len(orig) == 1, refused_removed=be2.report.removed,
                 refused_reasons=dict(be2.report.skipped))
        torch._dynamo.reset()
        # The spelling of older Dynamo versions.
        captured: list = []
        torch.compile(model, backend=lambda gm, ex: captured.append((gm, list(ex))) or gm.forward)(x)
        gm, ex = captured[0]
        _old_spelling(gm, ex)
        r.update(old_removed=fxfuse.fuse_linears(gm).removed, diff_old=_diff(gm(*ex)[0], model(x)))
        torch._dynamo.reset()
        with fxfuse.installed("post_grad_custom_pre_pass") as pass_:
            y2 = torch.compile(model)(x)
        r.update(inductor_removed=pass_.report.removed, diff_inductor=_diff(y2, model(x)))
        torch._dynamo.reset()
    # With autograd, the input's gradient sums over ranks: left alone, reason counted.
    xg = x.clone().requires_grad_()
    be3 = fxfuse.backend(inner="eager", training=True)
    torch.compile(model, backend=be3)(xg).sum().backward()
    g1 = xg.grad.clone()
    xg.grad = None
    model(xg).sum().backward()
    r.update(grad_removed=be3.report.removed, grad_reasons=dict(be3.report.skipped), diff_grad=_diff(g1, xg.grad))
    r.update(_edge_cases(mesh))
    Path(out, f"rank{rank}.json").write_text(json.dumps(r))


class Manual(nn.Module):
    """Tensor parallelism written by hand: two inputs whose projections
    interleave, and a projection too narrow to shard (1 row on 2 ranks:
    DTensor replicates its output instead)."""

    def __init__(self, mesh) -> None:
        from torch.distributed.tensor import Shard, distribute_tensor

        super().__init__()
        torch.manual_seed(0)
        self.mesh = mesh
        for name, rows in (("a1", 4), ("a2", 2), ("b1", 6), ("b2", 2), ("n1", 1), ("n2", 4)):
            w = distribute_tensor(torch.randn(rows, DIM), mesh, [Shard(0)])
            setattr(self, name, nn.Parameter(w, requires_grad=False))

    def forward(self, x, y):
        from torch.distributed.tensor import DTensor, Replicate, Shard

        rep = lambda t: DTensor.from_local(t, self.mesh, [Replicate()])  # noqa: E731
        proj = lambda xd, w: F.linear(xd, w).redistribute(placements=[Shard(-1)]).to_local()  # noqa: E731
        yb1 = rep(y)
        a1, a2 = proj(rep(x), self.a1), proj(rep(x), self.a2)
        yb2 = rep(y)
        b1, b2 = proj(yb1, self.b1), proj(yb2, self.b2)
        n1, n2 = F.linear(rep(x), self.n1).to_local(), F.linear(rep(x), self.n2).to_local()
        return a1, a2, b1, b2, n1, n2


def _edge_cases(mesh) -> dict:
    import fxfuse
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    r: dict = {}
    m = Manual(mesh)
    x, y = torch.randn(2, DIM), torch.randn(2, DIM)
    graphs: list = []

    def fresh():
        graphs.clear()
        with torch.no_grad():
            torch.compile(m, backend=lambda gm, ex: graphs.append((gm, ex)) or gm.forward)(x, y)
        torch._dynamo.reset()
        return graphs[0]

    with torch.no_grad():
        ref = m(x, y)
    gm, ex = fresh()
    before = _structure(gm)
    # Every group refused (groups of 3 and 2): the calls go back where they were.
    report = fxfuse.fuse_linears(gm, fxfuse.FuseConfig(min_group_size=4))
    r.update(refused_all_unchanged=_structure(gm) == before, refused_all_removed=report.removed)
    # The a/n2 group (3 calls) fuses, the b group (2) goes back: its old
    # neighbours are gone, and it must still come before its users.
    gm, ex = fresh()
    report = fxfuse.fuse_linears(gm, fxfuse.FuseConfig(min_group_size=3))
    gm.graph.lint()
    r.update(partial_removed=report.removed, partial_diff=max(_diff(a, b) for a, b in zip(gm(*ex), ref)))
    gm, ex = fresh()
    report = fxfuse.fuse_linears(gm)
    r.update(manual_removed=report.removed, manual_diff=max(_diff(a, b) for a, b in zip(gm(*ex), ref)),
             manual_shapes_equal=[tuple(t.shape) for t in gm(*ex)] == [tuple(t.shape) for t in ref])
    # A bare graph does not say whether it runs with autograd: an input that
    # needs a gradient is left alone (from_local's backward sums it over ranks).
    torch.manual_seed(0)
    plan = {n: ColwiseParallel() for n in ("wq", "wk", "wv", "w1", "w3")}
    block = parallelize_module(Block(), mesh, {**plan, "wo": RowwiseParallel(), "w2": RowwiseParallel()})
    xg = torch.randn(2, DIM, requires_grad=True)
    graphs.clear()
    torch.compile(block, backend=lambda gm, ex: graphs.append(gm) or gm.forward)(xg)
    torch._dynamo.reset()
    r["bare_grad_skipped"] = dict(fxfuse.fuse_linears(graphs[0]).skipped)
    # A parameter's .grad, attributes and hooks survive its shard moving in.
    p = block.wk.weight
    p.tag = "kept"
    p.grad = DTensor.from_local(torch.full_like(p.to_local(), 7.0), mesh, p.placements)
    calls: list = []
    block.wv.weight.register_hook(lambda g: calls.append("hook") or g)
    with torch.no_grad():
        torch.compile(block, backend=fxfuse.backend(inner="eager"))(xg)
        torch._dynamo.reset()
    block(xg).sum().backward()
    r.update(kept_tag=getattr(p, "tag", None), kept_grad=p.grad.to_local().flatten()[0].item() != 0,
             hook_calls=calls, stale_diff=_diff(torch.compile(block, backend=fxfuse.backend(inner="eager"))(xg),
                                                block(xg)))
    torch._dynamo.reset()
    return r


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("tp")
    sys.path.insert(0, str(Path(__file__).parent))  # the spawned ranks import this module
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD)
    return [json.loads(Path(out, f"rank{i}.json").read_text()) for i in range(WORLD)]


def test_each_rank_removes_its_local_siblings(ranks):
    for r in ranks:
        # Per block: q/k/v -> 1 and w1/w3 -> 1, over this rank's shards (half the rows).
        assert r["removed"] == 3 * LAYERS
        assert r["widths"] == [[DIM // 2, DIM // 4, DIM // 4], [DIM, DIM]] * LAYERS
        assert r["weights"] == ["storage"]
        assert r["fused"]["gemms"] == r["unfused"]["gemms"] - 3 * LAYERS


def test_older_dynamo_spelling_fuses_the_same(ranks):
    for r in ranks:
        assert r["old_removed"] == 3 * LAYERS and r["diff_old"] <= 1e-5


def test_no_collective_added(ranks):
    for r in ranks:
        # The row-parallel o and w2 each all-reduce: the count is not zero.
        assert r["unfused"]["collectives"] == 2 * LAYERS
        assert r["fused"]["collectives"] == r["unfused"]["collectives"]


def test_outputs_equal_unfused_and_eager(ranks):
    for r in ranks:
        assert r["diff_unfused"] <= 1e-5 and r["diff_eager"] <= 1e-5


def test_local_shards_share_one_storage_and_never_go_stale(ranks):
    for r in ranks:
        assert r["one_storage"] and r["stays_dtensor"] == "DTensor"
        assert r["diff_after_inplace"] <= 1e-5 and r["diff_after_load"] <= 1e-5


def test_refused_group_leaves_dynamo_graph_unchanged(ranks):
    for r in ranks:
        assert r["refused_removed"] == 0 and r["refused_unchanged"]
        assert r["refused_reasons"] == {"below_min_group_size": 5 * LAYERS}


def test_inductor_pass_fuses_local_gemms(ranks):
    for r in ranks:
        assert r["inductor_removed"] == 3 * LAYERS and r["diff_inductor"] <= 1e-5


def test_refused_calls_go_back_where_they_were(ranks):
    for r in ranks:
        assert r["refused_all_removed"] == 0 and r["refused_all_unchanged"]


def test_partly_fused_graph_stays_in_order(ranks):
    for r in ranks:
        assert r["partial_removed"] == 2 and r["partial_diff"] <= 1e-5  # (lint passed in the rank)


def test_replicated_output_is_not_a_colwise_projection(ranks):
    for r in ranks:
        # a1+a2+n2 lose 2 calls and b1+b2 one; n1's output is replicated (1
        # row on 2 ranks), not sharded on its last dim: it stays a DTensor call.
        assert r["manual_removed"] == 3 and r["manual_shapes_equal"] and r["manual_diff"] <= 1e-5


def test_bare_graph_with_input_needing_grad_is_left_alone(ranks):
    for r in ranks:
        assert r["bare_grad_skipped"] == {"sharded_input_needs_grad": 5}


def test_parameter_grad_attributes_and_hooks_survive(ranks):
    for r in ranks:
        assert r["kept_tag"] == "kept" and r["kept_grad"]
        assert r["hook_calls"] == ["hook"] and r["stale_diff"] <= 1e-5


def test_input_needing_grad_is_left_alone_with_reason(ranks):
    for r in ranks:
        assert r["grad_removed"] == 0
        assert r["grad_reasons"] == {"sharded_input_needs_grad": 5 * LAYERS}
        assert r["diff_grad"] <= 1e-5
