"""The fxfuse pass inside Inductor's custom-pass hooks."""

from __future__ import annotations

import json
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
    if patches.get("freezing"):
        # On CPU, freezing packs each weight for MKL (_mkl_linear) before the
        # post-grad passes: keep the mm / addmm that GPUs keep.
        patches["cpp.weight_prepack"] = False
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
            current = torch._inductor.config.post_grad_custom_pre_pass
            assert list(getattr(current, "passes", current)) == [other, p]  # torch 2.11: one chained pass
            torch._dynamo.reset()
            with torch.no_grad():
                torch.compile(llama3())(TOKENS)
        assert torch._inductor.config.post_grad_custom_pre_pass is other
    assert seen and p.report.removed == 9


def test_chained_passes_run_in_order():
    # What `installed` puts in a hook on torch 2.11, whose hooks call one pass.
    seen = []
    chain = fxfuse.inductor._Chain([lambda g: seen.append("other"), lambda g: seen.append("fxfuse")])
    chain(torch.fx.Graph())
    assert seen == ["other", "fxfuse"] and chain.uuid() is None  # a plain function: no caching
    assert fxfuse.inductor._Chain([fxfuse.inductor_pass()]).uuid() == (fxfuse.inductor_pass().uuid(),)


def test_installed_rejects_unknown_hook():
    with pytest.raises(ValueError, match="hook must be one of"):
        with fxfuse.installed("post_grad_pass"):
            pass


def test_uuid_covers_options():
    a, b = fxfuse.inductor_pass(), fxfuse.inductor_pass()
    assert a.uuid() == b.uuid() and a.uuid() != fxfuse.inductor_pass(min_group_size=3).uuid()
    assert a.uuid() != fxfuse.inductor_pass("joint_custom_pre_pass").uuid()  # the hook decides the recording
    assert fxfuse.inductor_pass(should_fuse=lambda g: True).uuid() is None  # callbacks bypass the cache


@pytest.mark.parametrize("hook, training", [(h, True) for h in HOOKS] + [
    ("joint_custom_pre_pass", False), ("post_grad_custom_pre_pass", False)])
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


# torch 2.11 runs pre-grad passes before every cache lookup; 2.13 runs those
# that have a uuid after the AOTAutograd lookup, so a hit skips them.
PRE_GRAD_BEFORE_LOOKUP = getattr(torch._inductor.config, "pre_grad_pass_timing", "early") == "early"


# Compiles a tiny model with a pass in hook argv[1] ("train": forward and
# backward) and prints what the process saw, as JSON.
CACHE_SCRIPT = """
import gc, json, sys, torch, fxfuse
from torch._dynamo.utils import counters

class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.o = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
        self.k, self.v = torch.nn.Linear(16, 8, bias=False), torch.nn.Linear(16, 8, bias=False)

    def forward(self, x):
        return self.o(self.q(x) + torch.cat([self.k(x), self.v(x)], -1))

hook, train = sys.argv[1], sys.argv[2] == "train"
torch.manual_seed(0)
model, x = Attention().train(train), torch.randn(2, 16)
with fxfuse.installed(hook, training=train) as p, torch.set_grad_enabled(train):
    out = torch.compile(model)(x)
    if train:
        out.sum().backward()
print(json.dumps({
    "report": p.report.as_dict(),
    "fxfuse": counters["fxfuse"],
    "fx_hits": counters["inductor"]["fxgraph_cache_hit"],
    "aot_hits": counters["aot_autograd"]["autograd_cache_hit"],
    "removed_counter": counters["inductor"]["fxfuse_linear_calls_removed"],
}))
gc.freeze()  # speed only: no collection of the whole heap at exit (~1.3 s a process)
"""


def compile_in_subprocess(cache_dir, hook, train=False, aot_cache=True):
    """Run CACHE_SCRIPT with the compile caches on (this file turns them off
    in-process); returns its JSON and its fxfuse log lines."""
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(cache_dir),
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "1" if aot_cache else "0",
        "TORCH_LOGS": "fxfuse",
        # Speed only: no pool of compile workers, no probing of the CPU's
        # vector ISAs (seconds of C++ builds in a fresh cache directory).
        "TORCHINDUCTOR_COMPILE_THREADS": "1",
        "TORCHINDUCTOR_VEC_ISA_OK": "0",
    }
    run = subprocess.run([sys.executable, "-c", CACHE_SCRIPT, hook, "train" if train else "infer"],
                         capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1], timeout=300)
    assert run.returncode == 0, run.stderr
    logged = [line[line.index("fxfuse: "):] for line in run.stderr.splitlines() if "fxfuse: " in line]
    return json.loads(run.stdout.splitlines()[-1]), logged


@pytest.mark.parametrize("hook, train", [(h, False) for h in HOOKS] + [("joint_custom_pre_pass", True)])
def test_cache_hit_still_reports(hook, train, tmp_path):
    (first, first_log), (second, second_log) = (compile_in_subprocess(tmp_path, hook, train) for _ in range(2))
    assert first["fx_hits"] == first["aot_hits"] == 0
    groups = [g["members"] for g in first["report"]["groups"]]
    assert groups == [["q", "k", "v"]] and first["report"]["removed"] == 2
    # The second process hit the AOTAutograd cache, so no pass ran there (but
    # see PRE_GRAD_BEFORE_LOOKUP), yet it reports the same groups through every
    # way the first one did.
    assert second["aot_hits"] == 1 and second["fx_hits"] >= 1
    assert second["report"] == first["report"] and second["fxfuse"] == first["fxfuse"]
    assert second["removed_counter"] == first["removed_counter"] == 2
    assert [line.replace(" (from the compile cache)", "") for line in second_log] == first_log
    cached = not (hook == "pre_grad_custom_pass" and PRE_GRAD_BEFORE_LOOKUP)  # else it ran, and reported once
    assert all(("(from the compile cache)" in line) == cached for line in second_log)
    assert "[q, k, v]" in first_log[0]


def test_fx_cache_hit_after_the_pass_ran_reports_once(tmp_path):
    # Without the AOTAutograd cache the joint pass runs again and reports; its
    # forward graph then hits the FX graph cache, which replays the same report.
    (first, _), (second, second_log) = (
        compile_in_subprocess(tmp_path, "joint_custom_pre_pass", aot_cache=False) for _ in range(2))
    assert second["aot_hits"] == 0 and second["fx_hits"] == 1
    assert second["report"] == first["report"] and second["fxfuse"] == first["fxfuse"]
    assert len(second_log) == 1 and "from the compile cache" not in second_log[0]


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
