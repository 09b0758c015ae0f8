"""Model zoo: Hugging Face ``transformers`` models from tiny configs, random weights.

Every model is built with ``from_config`` (nothing is downloaded), in eval mode,
with dropout off, ``use_cache=False`` and ``attn_implementation="eager"``:
llama, mistral, qwen2, mixtral, bert, distilbert, t5, vit and clip-text.

For each model, with ``fxfuse.backend(inner="eager")``:
  * outputs equal eager under ``torch.no_grad()``;
  * ``report.removed`` equals an independent count of sibling linears, taken by
    our own recording backend on the very graphs Dynamo hands to fxfuse
    (`count_siblings` below; it does not use ``fxfuse.match``), and nothing is
    reported as skipped;
  * the report's member names are module paths of the model (nn.Linear).
With the default inner compiler (Inductor), outputs equal eager (and the
counts agree) for three representative models only, to keep the file fast on
two CPU cores (a cold Inductor cache costs about 10 s before the first kernel):
llama (grouped-query q/k/v + gate/up, no bias), qwen2 (q/k/v with bias) and
t5 (encoder-decoder: the cross-attention k/v of every decoder layer read one
encoder output, a group of 4).
Two training steps (SGD) give gradients and losses equal to eager for llama
and bert, with the default options (weights that need gradients are left
alone) and with ``training=True`` (fused through an in-graph cat); and
``dynamic=True`` is checked on llama with two sequence lengths.

The table in docs/zoo.md comes from this file:

    python tests/test_zoo.py > docs/zoo.md
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Callable

import pytest
import torch
from torch import fx

import fxfuse

transformers = pytest.importorskip("transformers")

VOCAB = 64
SEQ = 8
BATCH = 2


# ---------------------------------------------------------------- the zoo

def _decoder(**extra) -> dict:
    return dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        use_cache=False, bos_token_id=0, eos_token_id=1, pad_token_id=2, **extra,
    )


def _config(name: str):
    t = transformers
    if name == "llama":
        return t.LlamaConfig(**_decoder())
    if name == "mistral":
        return t.MistralConfig(**_decoder(sliding_window=None))
    if name == "qwen2":
        return t.Qwen2Config(**_decoder())  # q/k/v with bias
    if name == "mixtral":
        return t.MixtralConfig(**_decoder(num_local_experts=4, num_experts_per_tok=2, sliding_window=None))
    if name == "bert":
        return t.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, pad_token_id=0,
        )
    if name == "distilbert":
        return t.DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=64,
            dropout=0.0, attention_dropout=0.0, pad_token_id=0,
        )
    if name == "t5":
        return t.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0,
            use_cache=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        )
    if name == "vit":
        return t.ViTConfig(
            image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
    if name == "clip-text":
        return t.CLIPTextConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
            bos_token_id=0, eos_token_id=2, pad_token_id=1,
        )
    raise KeyError(name)


CAUSAL_LM = {"llama", "mistral", "qwen2", "mixtral"}
ZOO = ["llama", "mistral", "qwen2", "mixtral", "bert", "distilbert", "t5", "vit", "clip-text"]
INDUCTOR = ["llama", "qwen2", "t5"]


def build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    auto = transformers.AutoModelForCausalLM if name in CAUSAL_LM else transformers.AutoModel
    model = auto.from_config(_config(name), attn_implementation="eager")
    if name == "clip-text":
        assert type(model).__name__ == "CLIPTextModel"
    return model.eval()


def inputs(name: str, seq: int = SEQ, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(BATCH, 3, 16, 16, generator=g)}
    ids = torch.randint(3, VOCAB, (BATCH, seq), generator=g)
    if name == "t5":
        return {"input_ids": ids, "decoder_input_ids": ids[:, : max(1, seq - 3)]}
    return {"input_ids": ids}


def tensors(out) -> dict:
    """The tensors of a ModelOutput (or tuple), by name, for assert_close."""
    if hasattr(out, "to_tuple"):
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    return {str(i): v for i, v in enumerate(out) if isinstance(v, torch.Tensor)}


# ------------------------------------------------- the independent count

LINEAR = torch._C._nn.linear


def _arg(node: fx.Node, i: int, name: str):
    return node.kwargs[name] if name in node.kwargs else (node.args[i] if len(node.args) > i else None)


def count_siblings(gm: fx.GraphModule) -> tuple[int, int, list[list[str]]]:
    """(linear calls, calls that sibling fusion can remove, the sibling groups).

    A group: the ``torch._C._nn.linear`` calls whose input is one node and whose
    weights are 2-D with one in_features and dtype (from their ``example_value``);
    a group of k can lose k - 1 calls. Written from scratch, without fxfuse.match.
    """
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is LINEAR]
    groups: dict[tuple, list[fx.Node]] = {}
    for n in calls:
        x, w = _arg(n, 0, "input"), _arg(n, 1, "weight")
        val = w.meta.get("example_value") if isinstance(w, fx.Node) else None
        if not isinstance(x, fx.Node) or not isinstance(val, torch.Tensor) or val.dim() != 2:
            continue
        groups.setdefault((x, int(val.shape[1]), val.dtype), []).append(n)
    sibs = [g for g in groups.values() if len(g) > 1]
    names = [[_module_name(n) for n in g] for g in sibs]
    return len(calls), sum(len(g) - 1 for g in sibs), names


def _module_name(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else node.name


class Recorder:
    """A backend that counts the siblings of every graph Dynamo hands it, then
    passes the graph on (to fxfuse, or to nothing)."""

    def __init__(self, then: Callable | None = None) -> None:
        self.then = then
        self.graphs = 0
        self.linears = 0
        self.removable = 0
        self.groups: list[list[str]] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: list):
        n, removable, groups = count_siblings(gm)  # before fxfuse sees the graph
        self.graphs += 1
        self.linears += n
        self.removable += removable
        self.groups += groups
        return self.then(gm, example_inputs) if self.then is not None else gm.forward


def compile_fused(model, inner="eager", options=None, **kw):
    be = fxfuse.backend(inner=inner, **(options or {}))
    rec = Recorder(be)
    return torch.compile(model, backend=rec, **kw), be, rec


# ---------------------------------------------------------------- tests

def check_report(be: fxfuse.Backend, rec: Recorder) -> None:
    """The report agrees with the independent count, and nothing was refused."""
    r = be.report
    assert r.errors == []
    assert r.graphs == rec.graphs
    assert r.before == rec.linears
    # No HF model here has a reason to refuse a sibling under no_grad (or with
    # training=True): no mutation, one dtype, static weight shapes.
    assert dict(r.skipped) == {}
    assert r.removed == rec.removable
    assert r.after == r.before - r.removed
    assert sorted(len(g.members) for g in r.groups) == sorted(len(g) for g in rec.groups)


# name -> (model, report) of test_zoo_matches_eager_and_independent_count,
# reused by test_zoo_group_names_are_module_paths to save a compile.
_DONE: dict[str, tuple] = {}


@pytest.mark.parametrize("name", ZOO)
def test_zoo_matches_eager_and_independent_count(name):
    model, inp = build(name), inputs(name)
    compiled, be, rec = compile_fused(model)
    with torch.no_grad():
        ref = model(**inp)
        out = compiled(**inp)
    _DONE[name] = (model, be.report)
    torch.testing.assert_close(tensors(out), tensors(ref))
    check_report(be, rec)
    assert rec.removable > 0


# Names must be module paths even where Dynamo enters the model through a
# wrapper of its forward (llama, mistral, qwen2: the nn_module_stack root is
# "L['args'][0]", which once gave names like "[0].model.layers.0...").
@pytest.mark.parametrize("name", ZOO)
def test_zoo_group_names_are_module_paths(name):
    if name not in _DONE:  # run alone
        model, inp = build(name), inputs(name)
        compiled, be, _ = compile_fused(model)
        with torch.no_grad():
            compiled(**inp)
        _DONE[name] = (model, be.report)
    model, report = _DONE[name]
    assert report.groups
    modules = dict(model.named_modules())
    bad = [m for g in report.groups for m in g.members if not isinstance(modules.get(m), torch.nn.Linear)]
    assert bad == []


@pytest.mark.parametrize("name", INDUCTOR)
def test_zoo_inductor_matches_eager(name):
    model, inp = build(name), inputs(name)
    compiled, be, rec = compile_fused(model, inner="inductor")
    with torch.no_grad():
        ref = model(**inp)
        out = compiled(**inp)
    torch.testing.assert_close(tensors(out), tensors(ref))
    check_report(be, rec)


def _loss(name: str, model, inp: dict) -> torch.Tensor:
    if name in CAUSAL_LM:
        return model(**inp, labels=inp["input_ids"]).loss
    return model(**inp).last_hidden_state.square().mean()


@pytest.mark.parametrize("training", [True, False], ids=["training=True", "default"])
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_zoo_training_step_gradients_match_eager(name, training):
    model = build(name).train()  # dropout is 0 in every config
    twin = copy.deepcopy(model)
    inp = inputs(name)
    compiled, be, rec = compile_fused(model, options={"training": True} if training else None)
    assert torch.is_grad_enabled()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.1)
    for step in range(2):
        loss, ref = _loss(name, compiled, inp), _loss(name, twin, inp)
        torch.testing.assert_close(loss, ref, msg=f"step {step}")
        loss.backward()
        ref.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        for n, q in twin.named_parameters():
            assert (grads[n] is None) == (q.grad is None), n
            if q.grad is not None:
                torch.testing.assert_close(grads[n], q.grad, msg=f"step {step}: {n}")
        opt.step(), opt_twin.step()
        opt.zero_grad(), opt_twin.zero_grad()
    if training:
        # With gradients the fused weights are an in-graph cat.
        check_report(be, rec)
        assert be.report.groups and {g.weights for g in be.report.groups} == {"cat"}
    else:
        # By default (training=False) weights that need gradients are left
        # alone: every linear of a sibling set is counted under that reason.
        r = be.report
        assert r.errors == [] and r.removed == 0 and r.before == r.after == rec.linears
        assert dict(r.skipped) == {"weights_need_grad": sum(len(g) for g in rec.groups)}


def test_zoo_dynamic_shapes_llama():
    model = build("llama")
    compiled, be, rec = compile_fused(model, dynamic=True)
    with torch.no_grad():
        for seq in (5, 11):
            inp = inputs("llama", seq=seq)
            torch.testing.assert_close(tensors(compiled(**inp)), tensors(model(**inp)), msg=f"seq {seq}")
    assert be.report.graphs == 1  # one dynamic graph serves both lengths
    check_report(be, rec)


# ---------------------------------------------------------------- docs/zoo.md

def _abbrev(members: tuple[str, ...]) -> str:
    """Module paths in one line: each dotted position once, the differing ones
    as {a,b}: 'l.0.q, l.0.k' -> 'l.0.{q,k}'."""
    parts = [m.split(".") for m in members]
    if len({len(p) for p in parts}) != 1:
        return "{" + ",".join(members) + "}"
    out = []
    for values in zip(*parts):
        distinct = list(dict.fromkeys(values))
        out.append(distinct[0] if len(distinct) == 1 else "{" + ",".join(distinct) + "}")
    return ".".join(out)


def _row(name: str, label: str, grad: bool, options: dict | None = None) -> str:
    import re

    torch._dynamo.reset()
    model, inp = build(name), inputs(name)
    compiled, be, rec = compile_fused(model, options=options)
    with torch.set_grad_enabled(grad):
        compiled(**inp)
    r = be.report
    shapes = Counter(re.sub(r"\.\d+\.", ".N.", _abbrev(g.members)) for g in r.groups)
    groups = "<br>".join(f"`{s}` ×{n}" if n > 1 else f"`{s}`" for s, n in shapes.items()) or "—"
    weights = "/".join(sorted({g.weights for g in r.groups})) or "—"
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(r.skipped.items())) or "—"
    return (f"| {label} | {r.graphs} | {r.before} → {r.after} | {r.removed} ({rec.removable}) "
            f"| {groups} | {weights} | {skipped} |")


def _table() -> str:
    head = [
        "| model | graphs | linear calls before → after | removed (independent count) "
        "| groups | weights | skipped (calls: reason) |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [_row(name, name, grad=False) for name in ZOO]
    for name in ("llama", "bert"):
        rows.append(_row(name, f"{name}, with grad", grad=True))
        rows.append(_row(name, f"{name}, with grad, `training=True`", grad=True, options={"training": True}))
    torch._dynamo.reset()
    return "\n".join(head + rows)


if __name__ == "__main__":
    import sys

    sys.stdout.write(
        "# Model zoo\n\n"
        "What fxfuse does to tiny Hugging Face `transformers` models with random weights\n"
        "(`from_config`, 2 layers, hidden size 32, batch 2, sequence 8, `use_cache=False`,\n"
        "`attn_implementation=\"eager\"`), compiled with `fxfuse.backend(inner=\"eager\")`\n"
        "under `torch.no_grad()` unless the row says otherwise. The independent count is\n"
        "the number of removable calls that `tests/test_zoo.py` counts itself on the same\n"
        "Dynamo graphs (sibling `linear` calls: one input node, 2-D weights of one\n"
        "in_features and dtype; a set of k can lose k - 1). Member names are shortened:\n"
        "each path once with `{a,b}` where members differ, `N` any index (layer), `×n` how many\n"
        "such groups. \"storage\": the group's weights were moved once into one tensor;\n"
        "\"cat\": concatenated in the graph (needed with gradients).\n\n"
        "`tests/test_zoo.py` checks, for each model: outputs equal eager (with\n"
        "`inner=\"eager\"`; with Inductor for llama, qwen2 and t5), the counts above and\n"
        "that nothing is skipped, member names are module paths; a training step's\n"
        "gradients equal eager (llama, bert; default options and `training=True`); and\n"
        "`dynamic=True` with two sequence lengths (llama).\n\n"
        f"transformers {transformers.__version__}, torch {torch.__version__}, CPU. Produced by:\n\n"
        "```bash\npython tests/test_zoo.py > docs/zoo.md\n```\n\n"
        + _table()
        + "\n\n"
        "Notes. Every sibling set is fused: q/k/v (k/v narrower under grouped-query\n"
        "attention), gate/up, and in t5 the cross-attention k/v of both decoder layers,\n"
        "which all read the encoder output (one group of 4). The output projections,\n"
        "down projections and heads have no sibling. Mixtral's experts are 3-D\n"
        "parameters in transformers 5, not linear calls, and its router reads its input\n"
        "alone. With gradients, the default options leave weights that need gradients\n"
        "alone (`weights_need_grad`: every call of a sibling set is counted);\n"
        "`training=True` fuses them through an in-graph cat.\n"
    )
