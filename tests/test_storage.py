"""Fused weights live in one storage: same Parameters, no second copy, never stale."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse import weights
from fxfuse.models import LlamaConfig, Transformer

CFG = LlamaConfig(n_layer=2)


def make(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


TOKENS = torch.randint(0, CFG.vocab, (2, 6), generator=torch.Generator().manual_seed(1))


def storage_bytes(model) -> int:
    """Bytes of every distinct storage behind the model's parameters."""
    seen = {}
    for p in model.parameters():
        s = p.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def compiled(model, inner="eager", **options):
    be = fxfuse.backend(inner=inner, **options)
    return torch.compile(model, backend=be), be


def check(fn, model):
    with torch.no_grad():
        torch.testing.assert_close(fn(TOKENS), model(TOKENS))


def test_storage_same_parameters_one_storage_no_second_copy():
    model = make()
    params = dict(model.named_parameters())
    shapes = {k: p.shape for k, p in params.items()}
    before = storage_bytes(model)
    fn, be = compiled(model)
    check(fn, model)
    assert {g.weights for g in be.report.groups} == {"storage"} and be.report.removed == 6
    after = dict(model.named_parameters())
    assert all(after[k] is params[k] and after[k].shape == shapes[k] for k in params)
    assert all(p.is_contiguous() for p in after.values())
    att = model.layers[0].attention
    ptrs = {p.untyped_storage().data_ptr() for p in (att.wq.weight, att.wk.weight, att.wv.weight)}
    assert len(ptrs) == 1, "q/k/v weights should share one storage"
    assert storage_bytes(model) == before, "fusing must not keep a second copy"
    assert model.state_dict().keys() == params.keys()


def test_storage_mixed_bias_adds_only_the_zero_rows():
    cfg = LlamaConfig(n_layer=1, q_bias=True)
    model = make(cfg=cfg)
    before = storage_bytes(model)
    fn, _ = compiled(model)
    with torch.no_grad():
        torch.testing.assert_close(fn(TOKENS), model(TOKENS))
    zero_rows = 2 * cfg.n_kv_head * cfg.head_dim * 4  # k and v have no bias: fp32 zeros
    assert storage_bytes(model) == before + zero_rows


def _mul(model):
    model.layers[0].attention.wk.weight.mul_(3)


def _zero(model):
    model.layers[1].feed_forward.w3.weight.zero_()


def _optimizer_step(model):
    with torch.enable_grad():
        model(TOKENS).square().mean().backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    model.zero_grad()


def _load_state_dict(model):
    model.load_state_dict(make(seed=5).state_dict())


def _load_state_dict_assign(model):
    model.load_state_dict(make(seed=6).state_dict(), assign=True)


def _replace_parameter(model):
    ff = model.layers[0].feed_forward
    ff.w1.weight = nn.Parameter(torch.randn_like(ff.w1.weight))


def _set_data(model):
    att = model.layers[1].attention
    att.wv.weight.data = torch.randn_like(att.wv.weight)


@pytest.mark.parametrize(
    "change",
    [_mul, _zero, _optimizer_step, _load_state_dict, _load_state_dict_assign, _replace_parameter, _set_data],
)
def test_storage_never_stale(change):
    model = make()
    fn, _ = compiled(model)
    check(fn, model)
    with torch.no_grad():
        change(model)
    check(fn, model)  # the next compiled call sees the change, as eager does
    check(fn, model)


def test_storage_never_stale_under_inductor():
    model = make()
    fn, be = compiled(model, inner="inductor")
    check(fn, model)
    with torch.no_grad():
        _mul(model)
        check(fn, model)
        _replace_parameter(model)
        check(fn, model)
    assert be.report.graphs == 1


def test_storage_model_to_dtype():
    model = make()
    fn, be = compiled(model)
    check(fn, model)
    model.to(torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fn(TOKENS), model(TOKENS))
    att = model.layers[0].attention
    assert att.wq.weight.dtype == torch.float64
    assert att.wq.weight.untyped_storage().data_ptr() == att.wk.weight.untyped_storage().data_ptr()
    model.to(torch.float32)
    check(fn, model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_storage_model_to_device():
    model = make()
    fn, _ = compiled(model)
    check(fn, model)
    model.to("cuda")
    t = TOKENS.cuda()
    with torch.no_grad():
        torch.testing.assert_close(fn(t), model(t))


def test_storage_fast_path_copies_nothing(monkeypatch):
    model = make()
    fn, _ = compiled(model)
    check(fn, model)
    adopted = []
    real = weights.Storage._adopt
    monkeypatch.setattr(weights.Storage, "_adopt", lambda self, i, m: (adopted.append(i), real(self, i, m)))
    with torch.no_grad():
        _mul(model)  # in place: already in the storage
        fn(TOKENS)
        assert adopted == []
        _replace_parameter(model)  # a new tensor: exactly one member copied in
        fn(TOKENS)
        assert adopted == [0]


@pytest.mark.parametrize("training", [True, False])
def test_storage_training_grads_on_original_parameters(training):
    model, twin = make(), make()
    fn, be = compiled(model, training=training)
    opt_a = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(twin.parameters(), lr=0.1)
    for _ in range(3):
        for m, f, opt in ((model, fn, opt_a), (twin, twin, opt_b)):
            opt.zero_grad()
            f(TOKENS).square().mean().backward()
            opt.step()
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=name)
            torch.testing.assert_close(p, q, msg=name)
    if training:
        assert {g.weights for g in be.report.groups} == {"cat"}  # autograd needs the members
        assert be.report.removed == 6
    else:  # the default: measured slower with gradients, so left alone
        assert be.report.removed == 0 and be.report.skipped == {"weights_need_grad": 10}


def test_storage_state_dict_save_load_round_trip():
    model = make()
    fn, _ = compiled(model)
    check(fn, model)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = make(seed=9)
    fresh.load_state_dict(torch.load(buf))
    check(fresh, model)
    # The saved tensors are the members' own rows, not the fused tensors.
    buf.seek(0)
    sd = torch.load(buf)
    assert sd["layers.0.attention.wk.weight"].shape == model.layers[0].attention.wk.weight.shape


def test_storage_unfuse_for_formats_that_refuse_shared_storage():
    model = make()
    fn, _ = compiled(model)
    check(fn, model)
    moved = fxfuse.unfuse(model)
    assert moved == 10  # q,k,v and w1,w3 in 2 layers
    ptrs = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(ptrs) == len(set(ptrs)), "after unfuse no two parameters share storage"
    check(fn, model)  # the compiled model re-fuses on its next call


def test_storage_shared_weight_across_groups_falls_back_to_cat():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x, y):
            w = self.a.weight  # used by two groups: one storage cannot hold it twice
            return (nn.functional.linear(x, w), self.b(x), nn.functional.linear(y, w), self.c(y))

    model = Tied().eval()
    x, y = torch.randn(2, 8), torch.randn(2, 8)
    fn, be = compiled(model)
    with torch.no_grad():
        torch.testing.assert_close(fn(x, y), model(x, y))
    assert be.report.removed == 2
    assert [g.weights for g in be.report.groups] == ["cat", "cat"]


def test_storage_deepcopy_of_fused_model_is_independent():
    model = make()
    fn, _ = compiled(model)
    check(fn, model)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.layers[0].attention.wq.weight.mul_(2)
    check(fn, model)
    with torch.no_grad():
        assert not torch.equal(clone(TOKENS), model(TOKENS))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_storage_cuda_graphs_stay_on():
    model = Transformer(LlamaConfig(n_layer=2)).cuda().eval()
    model.setup_cache(1)
    fn = torch.compile(model, backend=fxfuse.backend(mode="reduce-overhead"))
    t, p = torch.tensor([[3]], device="cuda"), torch.tensor([1], device="cuda")
    with torch.no_grad():
        for _ in range(4):
            torch.compiler.cudagraph_mark_step_begin()
            out = fn(t, p).clone()
        model.setup_cache(1)
        ref = model(t, p)
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)


def test_storage_steady_calls_take_the_fast_path(monkeypatch):
    # Once the members live in their slices, a call is one pointer check and
    # the compiled graph: the fused tensors are not looked up again. The
    # check is torch's C++ function on CUDA builds, which takes a list and
    # nothing else; a strict stand-in holds the CPU run to the same contract.
    from fxfuse import inputs

    def strict(tensors, ptrs, indices):
        assert type(tensors) is list, type(tensors)
        return all(tensors[i].data_ptr() == ptrs[i] for i in indices)

    monkeypatch.setattr(torch._C, "_tensors_data_ptrs_at_indices_equal", strict, raising=False)
    lookups = []
    fused = inputs._Slot.fused
    monkeypatch.setattr(inputs._Slot, "fused", lambda self, args: lookups.append(1) or fused(self, args))
    model = make()
    fn, be = compiled(model)
    check(fn, model)
    first = len(lookups)
    assert be.report.removed == 6 and first > 0
    for _ in range(3):
        check(fn, model)
    assert len(lookups) == first  # no re-fusing on steady calls
    with torch.no_grad():
        model.layers[0].attention.wq.weight.mul_(2.0)  # in place: still the fast path, new values
    check(fn, model)
    assert len(lookups) == first
