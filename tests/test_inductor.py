"""The fxfuse pass inside Inductor's custom-pass hooks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import fxfuse
from fxfuse.inductor import HOOKS
from fxfuse.models import LlamaConfig, Transformer

TOKENS = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _no_compile_caches():
    """A cache hit skips the passes: these tests must see them run (the
    machine's cache directory outlives a test run)."""
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield
# Inductor's GEMM calls on CPU: extern mm/addmm, or MKL's packed linear after freezing.
GEMM = re.compile(r"extern_kernels\.(?:mm|addmm)\(|_mkl_linear(?:\.default)?\(")


def llama3():
    """3 layers of q,k,v,o + gate,up,down; grouped KV heads; a bias on q only."""
    torch.manual_seed(0)
    return Transformer(LlamaConfig(n_layer=3, q_bias=True)).eval()


def gemm_calls(model, **patches):
    torch._dynamo.reset()
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False, **patches):
        out, codes = run_and_get_code(torch.compile(model), TOKENS)
    return out, sum(len(GEMM.findall(c)) for c in codes)


@pytest.fixture(scope="module")
def baseline():
    model = llama3()
    with torch.no_grad():
        ref = model(TOKENS)
    return ref, {f: gemm_calls(model, freezing=f)[1] for f in (False, True)}


@pytest.mark.parametrize("freezing", [False, True], ids=["plain", "freezing"])
@pytest.mark.parametrize("hook", HOOKS)
def test_inductor_hook_removes_9_gemms(hook, freezing, baseline):
    if freezing and hook == "post_grad_custom_pre_pass":
        pytest.skip("on CPU, freezing packs the weights for MKL before post-grad passes run")
    ref, base = baseline
    with fxfuse.installed(hook) as p:
        out, calls = gemm_calls(llama3(), freezing=freezing)
    torch.testing.assert_close(out, ref)
    assert p.report.removed == 9 and base[freezing] - calls == 9


def test_installed_keeps_other_passes():
    seen = []

    def other(graph):
        seen.append(graph)

    with torch._inductor.config.patch(post_grad_custom_pre_pass=other):
        with fxfuse.installed("post_grad_custom_pre_pass") as p:
            assert torch._inductor.config.post_grad_custom_pre_pass == [other, p]
            torch._dynamo.reset()
            with torch.no_grad():
                torch.compile(llama3())(TOKENS)
        assert torch._inductor.config.post_grad_custom_pre_pass is other
    assert seen and p.report.removed == 9


def test_installed_rejects_unknown_hook():
    with pytest.raises(ValueError, match="hook must be one of"):
        with fxfuse.installed("post_grad_pass"):
            pass


def test_uuid_covers_options():
    a, b = fxfuse.inductor_pass(), fxfuse.inductor_pass()
    assert a.uuid() == b.uuid() and a.uuid() != fxfuse.inductor_pass(min_group_size=3).uuid()
    assert fxfuse.inductor_pass(should_fuse=lambda g: True).uuid() is None  # callbacks bypass the cache


@pytest.mark.parametrize("hook, training", [(h, True) for h in HOOKS] + [("joint_custom_pre_pass", False)])
def test_training_gradients(hook, training):
    model, twin = llama3(), llama3()
    model.train(), twin.train()
    torch._dynamo.reset()
    with fxfuse.installed(hook, training=training) as p:
        out = torch.compile(model)(TOKENS)
    ref = twin(TOKENS)
    torch.testing.assert_close(out, ref)
    out.square().mean().backward()
    ref.square().mean().backward()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    if training:
        assert p.report.removed == 9
    else:  # measured slower with gradients: left alone by default
        assert p.report.removed == 0 and p.report.skipped["weights_need_grad"] == 15


CACHE_SCRIPT = """
import torch, fxfuse
from fxfuse.models import LlamaConfig, Transformer
torch.manual_seed(0)
m = Transformer(LlamaConfig(n_layer=3, q_bias=True)).eval()
with torch.no_grad(), fxfuse.installed("post_grad_custom_pre_pass"):
    torch.compile(m)(torch.randint(0, 128, (2, 4)))
c = torch._dynamo.utils.counters["inductor"]
print(c["fxgraph_cache_hit"], c["fxfuse_linear_calls_removed"])
"""


def test_cache_hit_still_reports(tmp_path):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", CACHE_SCRIPT], capture_output=True, text=True, env=env,
                           cwd=Path(__file__).parents[1], timeout=600) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr
    (hits1, removed1), (hits2, removed2) = (map(int, r.stdout.split()[-2:]) for r in runs)
    assert hits1 == 0 and removed1 == 9
    assert hits2 >= 1 and removed2 == 9  # the pass did not run; the cache replayed its counters


def test_frozen_constants_are_concatenated_once():
    # After freezing (post-grad hook) the weights are constants: get_attr nodes.
    class Frozen(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w2, self.b2 = torch.randn(4, 8), torch.randn(6, 8), torch.randn(6)

        def forward(self, x):
            return torch.nn.functional.linear(x, self.w1), torch.nn.functional.linear(x, self.w2, self.b2)

    model, x = Frozen(), torch.randn(3, 8)
    gm = torch.fx.symbolic_trace(model)
    # As Inductor sees it after freezing: aten ops over constants.
    gm = torch.fx.experimental.proxy_tensor.make_fx(gm)(x)
    old = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    assert len(old) == 3 and all(hasattr(gm, t) for t in old)
    fxfuse.inductor_pass()(gm.graph)
    gm.recompile()
    attrs = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    assert sorted(attrs) == ["_fxfuse_constant_0", "_fxfuse_constant_1"] and "cat" not in gm.code
    assert not any(hasattr(gm, t) for t in old)  # the old constants go: no second copy kept
    assert gm._fxfuse_constant_0.shape == (10, 8)
    torch.testing.assert_close(gm(x), model(x))
