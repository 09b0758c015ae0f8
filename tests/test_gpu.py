"""Checks that need a GPU (skipped on CPU): AOTInductor and the Inductor pass on CUDA."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import fxfuse
from fxfuse.inductor import HOOKS
from fxfuse.models import LlamaConfig, Transformer, quantize_int8

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def llama3():
    torch.manual_seed(0)
    return Transformer(LlamaConfig(n_layer=3, q_bias=True)).cuda().eval()


TOKENS = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(0))
GEMM = re.compile(r"extern_kernels\.(?:mm|addmm)\(|triton_tem_fused_(?:mm|addmm)\w*\.run\(")


AOTI_SCRIPT = """
import sys, torch, fxfuse
from fxfuse.models import LlamaConfig, Transformer
torch.manual_seed(0)
m = Transformer(LlamaConfig(n_layer=3, q_bias=True)).cuda().eval()
t = torch.randint(0, 128, (2, 4)).cuda()
ep = torch.export.export(m, (t,))
if sys.argv[1] == "fused":
    ep = fxfuse.fuse_exported(ep)
    assert ep.fxfuse_report.removed == 9
path = torch._inductor.aoti_compile_and_package(ep, package_path=sys.argv[2])
with torch.no_grad():
    torch.testing.assert_close(torch._inductor.aoti_load_package(path)(t), m(t), atol=1e-3, rtol=1e-3)
print("ok")
"""


def test_gpu_aoti(tmp_path):
    # In a subprocess, after the same check on the unfused program: on the GPU
    # machine of record (torch 2.11) AOTInductor's loader crashed with a
    # segmentation fault for the unfused program too.
    def run(kind):
        return subprocess.run([sys.executable, "-c", AOTI_SCRIPT, kind, str(tmp_path / f"{kind}.pt2")],
                              capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])

    control = run("unfused")
    if control.returncode != 0:
        pytest.skip(f"AOTInductor fails here without fxfuse too (exit {control.returncode})")
    fused = run("fused")
    assert fused.returncode == 0 and "ok" in fused.stdout, fused.stderr[-2000:]


@pytest.mark.parametrize("freezing", [False, True], ids=["plain", "freezing"])
@pytest.mark.parametrize("hook", HOOKS)
def test_gpu_inductor_hook(hook, freezing):
    model, t = llama3(), TOKENS.cuda()
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False, freezing=freezing):
        ref = model(t)
        torch._dynamo.reset()
        _, base = run_and_get_code(torch.compile(model), t)
        torch._dynamo.reset()
        with fxfuse.installed(hook) as p:
            out, codes = run_and_get_code(torch.compile(model), t)
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)
    count = lambda cs: sum(len(GEMM.findall(c)) for c in cs)  # noqa: E731
    # 22 linears, 9 of them removed: 13 GEMMs. On CUDA, freezing's own passes
    # merge same-shaped siblings (k with v, w1 with w3: 16 GEMMs without
    # fxfuse); a post-grad pass runs after them and merges q into k+v.
    assert count(codes) == 13 and count(base) == (16 if freezing else 22)
    assert p.report.removed == (3 if freezing and hook == "post_grad_custom_pre_pass" else 9)


@pytest.mark.parametrize("freezing", [False, True], ids=["plain", "freezing"])
@pytest.mark.parametrize("hook", HOOKS)
def test_gpu_int8_inductor_hook(hook, freezing):
    # Weight-only int8 in bf16 (gpt-fast's form). Fused under freezing, where
    # the concatenated int8 weights become constants; without it they would
    # be concatenated on every call, so the groups are left alone.
    torch.manual_seed(0)
    model = quantize_int8(Transformer(LlamaConfig(n_layer=2)).to(torch.bfloat16)).cuda().eval()
    t = TOKENS.cuda()
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False, freezing=freezing):
        ref = model(t).float()
        torch._dynamo.reset()
        try:
            torch.compile(model)(t)
        except Exception as e:  # noqa: BLE001
            pytest.skip(f"Inductor fails on this model without fxfuse: {type(e).__name__}")
        torch._dynamo.reset()
        with fxfuse.installed(hook) as p:
            out = torch.compile(model)(t).float()
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2  # bf16: two orders of summation
    if freezing:
        assert p.report.removed == 6 and len(p.report.groups) == 4
    else:
        assert p.report.removed == 0 and p.report.skipped == {"quantized_weights_concatenated_per_call": 10}
