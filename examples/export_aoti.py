"""torch.export + fxfuse + AOTInductor: the fused weights are parameters of
the exported program, so the compiled binary concatenates nothing per call.

    python examples/export_aoti.py
"""

import tempfile
from pathlib import Path

import torch

import fxfuse
from fxfuse.models import LlamaConfig, Transformer


def build():
    torch.manual_seed(0)
    model = Transformer(LlamaConfig(n_layer=2)).eval()
    return model, (torch.randint(0, 128, (1, 8)),)


def main():
    model, (tokens,) = build()
    ep = fxfuse.fuse_exported(torch.export.export(model, (tokens,)))
    ep.validate()
    print(ep.fxfuse_report)
    with tempfile.TemporaryDirectory() as d:
        path = torch._inductor.aoti_compile_and_package(ep, package_path=str(Path(d) / "model.pt2"))
        runner = torch._inductor.aoti_load_package(path)
        with torch.no_grad():
            torch.testing.assert_close(runner(tokens), model(tokens))
    print("AOTInductor output matches eager")


if __name__ == "__main__":
    main()
