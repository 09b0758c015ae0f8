"""Property-based fuzzer: random small programs built around sibling linears.

Each example is a random program, written as Python source (shown when an
example fails, ready to paste): a small ``nn.Module`` whose weights live in
``nn.Linear`` submodules, or a function that takes its weights as arguments.
It has one or more sources (x, a view of x or a tensor computed from it, the
output of an earlier linear) read by 2-6 linears (``F.linear``, a module call,
``x @ w.t() + b``, ``torch.addmm``); 2-D and 3-D inputs; weights computed in
the graph (``w * 2``, ``w.t().t()``, ``w + w'``, ``w[:n]``, ``cat([w, w'])``,
``w * y.mean()`` from another linear's output); linears on another linear's
output, so that groups form chains (a group on a member of another group),
mixed with computed and shared weights; the same weight used twice or
by two groups, tied weights and tied modules; 1-D weights, broadcast and
mixed bias; non-contiguous weights; in-place edits of the input or of a view of
it (made by any view function, ``inplace=`` by position too), of a weight or a
bias (under no_grad), or of a linear's output, between the reads; a linear
alone in a ``no_grad``/``enable_grad``/``autocast`` region; graph breaks;
outputs returned directly or combined; ``dynamic=True/False/None`` and a
second batch size. For each program:

  * eager and ``torch.compile(fn, backend=fxfuse.backend(inner="eager", ...))``
    give equal outputs and leave equal inputs and weights behind (the edits),
    with random fxfuse options (``training``, ``weights="cat"``,
    ``min_group_size=3``);
  * the caller may write the first output in place: the other outputs must
    not change, nor may the write raise;
  * a second call, after an edit from outside (in place, a new Parameter,
    ``load_state_dict``, ``assign=True``, ``fxfuse.unfuse``, ``.double()``, new
    tensors), sometimes in the other grad mode, is equal again (the fused
    storage must never be stale);
  * this runs under ``torch.no_grad()`` and, where the program writes no leaf
    that needs a gradient, with grad as well, comparing every gradient;
  * the backend never raises and ``report.errors == []``.

CI runs FXFUSE_FUZZ_EXAMPLES examples (default 50: the pair takes about half a
minute on two cores) twice: with a fixed seed (the same programs every run) and
with a fresh one. Nightly-style:

    FXFUSE_FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz.py -q -k backend_matches

Replaying a failure: the report shows the program (as source), the run's
seed (``FXFUSE_FUZZ_SEED=<n>`` with the same FXFUSE_FUZZ_EXAMPLES replays the
whole run; without it each run draws a new seed) and a
``@reproduce_failure(...)`` blob for this one example.
``pytest --hypothesis-show-statistics`` shows how often each path ran (groups
fused, storage vs cat, each refusal reason, graph breaks).

Bugs this fuzzer found are pinned below as minimal reproductions
(``test_bug_*``). The open ones (OPEN_BUGS) are strict xfails and kept out of
the generated programs; ``FXFUSE_FUZZ_KNOWN_BUGS=1`` lets them back in.
"""

from __future__ import annotations

import copy
import os
import random
import re
import textwrap
import traceback
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxfuse

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, note, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("FXFUSE_FUZZ_EXAMPLES", "50"))  # per test: fixed and fresh seed
SEED = int(os.environ.get("FXFUSE_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
FIXED_SEED = 20261201
KNOWN_BUGS = os.environ.get("FXFUSE_FUZZ_KNOWN_BUGS") == "1"

# Bugs this fuzzer found that are still open in fxfuse, by the name of their
# reproduction below (test_bug_<name>). While a name is listed, its
# reproduction is a strict xfail and the generator leaves the construct out
# (unless FXFUSE_FUZZ_KNOWN_BUGS=1); once fixed, drop the name: the
# reproduction then guards the fix and the fuzzer explores the construct.
OPEN_BUGS: set[str] = set()


def allowed(bug: str) -> bool:
    """May the generator use the construct that triggers `bug`?"""
    return KNOWN_BUGS or bug not in OPEN_BUGS


def bug(name: str, reason: str):
    """The mark of a bug's reproduction: a strict xfail while the bug is open."""
    return pytest.mark.xfail(name in OPEN_BUGS, strict=True, reason=f"open fxfuse bug: {reason}")


# ------------------------------------------------------------ programs

@dataclass
class Program:
    """A generated program: its source and what the harness must know about it."""

    kind: str  # "module" or "function"
    shape: tuple[int, ...]  # of x; the last dim is K
    dtype: torch.dtype
    widths: tuple[int, ...]  # out_features of each weight slot
    biases: tuple[bool, ...]  # whether each slot has a bias
    tied: tuple[tuple[str, int, int], ...]  # ("weight" | "module", j, i): slot j is slot i's
    requires_grad: bool  # weights need gradients (module: not frozen)
    body: list[str]
    returns: str
    writes_weights: bool  # the body edits a weight or bias in place
    writes_input: bool  # the body edits x (or a view of it) in place
    writes_output: bool  # the body edits a linear's output in place
    external: str  # what happens to the weights between the two calls
    flip: bool  # the second call runs in the other grad mode (where grad_ok)
    shape2: tuple[int, ...]  # of x in the second call (a new batch size, or the same)
    dynamic: bool | None  # torch.compile(dynamic=...)
    noncontig: bool  # weights are transposed views (not contiguous)
    caller_writes: bool  # the caller writes the first output in place after the call
    options: dict = field(default_factory=dict)  # fxfuse.backend options

    def source(self) -> str:
        if self.kind == "module":
            head = "def forward(self, x):"
        else:
            args = ["x"] + [f"w{i}" for i in range(len(self.widths))]
            args += [f"b{i}" for i, b in enumerate(self.biases) if b]
            head = f"def f({', '.join(args)}):"
        return head + "\n" + textwrap.indent("\n".join(self.body + [f"return {self.returns}"]), "    ")

    @property
    def grad_ok(self) -> bool:
        """May this program run with grad? Not if it writes a leaf that needs one."""
        return not (self.writes_weights and self.requires_grad)

    @property
    def grad_matters(self) -> bool:
        """Does anything need a gradient in a run with grad (weights, or x when
        the program does not write it)? If not, that run is the no_grad one again."""
        return self.requires_grad or not self.writes_input

    def make(self, seed_: int):
        """(callable, args) for one call: a module and (x,), or a function and
        (x, *weights, *biases). Tied weights are the same tensor object."""
        g = torch.Generator().manual_seed(seed_)
        k = self.shape[-1]

        def rand(*s):
            return (torch.randn(*s, generator=g) * 0.5).to(self.dtype)

        def weight(n):
            # A [1, K] weight made by .t() is contiguous with strides (1, 1).
            if self.noncontig and (n > 1 or allowed("storage_keeps_parameter_strides")):
                return rand(k, n).t()
            return rand(n, k)

        x = rand(*self.shape)
        ns: dict = {"torch": torch, "F": F}
        exec(self.source(), ns)  # noqa: S102 - our own generated code
        if self.kind == "module":
            m = type("Generated", (nn.Module,), {"forward": ns["forward"]})()
            for i, (n, b) in enumerate(zip(self.widths, self.biases)):
                lin = nn.Linear(k, n, bias=b, dtype=self.dtype)
                lin.weight = nn.Parameter(weight(n))
                if b:
                    lin.bias = nn.Parameter(rand(n))
                setattr(m, f"l{i}", lin)
            for what, j, i in self.tied:
                if what == "module":
                    setattr(m, f"l{j}", getattr(m, f"l{i}"))
                else:
                    getattr(m, f"l{j}").weight = getattr(m, f"l{i}").weight
            m.requires_grad_(self.requires_grad)
            return m, (x,)
        ws = [weight(n) for n in self.widths]
        bs = [rand(n) for n in self.widths]
        for what, j, i in self.tied:
            ws[j] = ws[i]
            if what == "module":
                bs[j] = bs[i]
        for t in ws + bs:
            t.requires_grad_(self.requires_grad)
        return ns["f"], (x, *ws, *[b for b, has in zip(bs, self.biases) if has])


# ------------------------------------------------------------ the generator

# Second sources. Views of x first (a write to x reaches them), then fresh tensors.
VIEWS_OF_X = {
    2: ["x[:, :]", "x.view(-1, {k})", "x.reshape(-1, {k})", "x.unsqueeze(0)", "x[0]", "x.detach()"],
    3: ["x[:, :, :]", "x.view(-1, {k})", "x.flatten(0, 1)", "x.transpose(0, 1)", "x[0]",
        "x.reshape(-1, {k})", "torch.movedim(x, 0, 1)", "x.permute(1, 0, 2)"],
}
FRESH_FROM_X = ["x.sin()", "x * 1", "x + 0.5", "torch.relu(x)", "x.clone()"]
# In-place writes to x: the tensor written (x, a view of it) and the op.
WRITES = {
    2: ["x", "x[:, :1]", "x[0]", "x.view(-1)", "x.t()"],
    3: ["x", "x[..., :1]", "x[0]", "x.view(-1)", "x.transpose(0, 1)", "x.flatten(0, 1)"],
}
WRITE_OPS = ["{t}.add_(1)", "{t}.mul_(0.5)", "{t}.sub_(0.25)", "{t}.clamp_(-0.5, 0.5)", "{t}.neg_()",
             "F.relu({t}, inplace=True)", "torch.relu_({t})", "{t}.copy_({t} * 2)"]
# Views that fxfuse's alias tracking once missed (test_bug_write_through_any_view).
UNLISTED_VIEWS = {
    2: ["x.T", "x.mT", "torch.ravel(x)", "torch.adjoint(x)", "torch.tensor_split(x, 1)[0]",
        "torch.unflatten(x, -1, (1, -1))", "torch.broadcast_to(x, (1, *x.shape))[0]",
        "torch.swapdims(x, 0, 1)", "torch.moveaxis(x, 0, 1)", "x.data", "torch.real(x)"],
    3: ["x.mT", "torch.ravel(x)", "torch.tensor_split(x, 1)[0]", "torch.unflatten(x, -1, (1, -1))",
        "torch.broadcast_to(x, (1, *x.shape))[0]", "torch.swapdims(x, 0, 1)", "torch.moveaxis(x, 0, 1)",
        "x.data", "torch.real(x)", "torch.atleast_3d(x)"],
}
UNLISTED_SOURCES = {3: ["torch.swapdims(x, 0, 1)", "torch.moveaxis(x, 0, 1)", "x.data"], 2: ["x.data"]}
# A linear alone in a region of another grad mode or autocast (test_bug_region_boundary).
REGIONS = ["torch.no_grad()", "torch.enable_grad()", "torch.autocast('cpu', dtype=torch.bfloat16)"]
# The inplace flag passed by position (test_bug_positional_inplace).
POSITIONAL_INPLACE = ["F.relu({t}, True)", "F.hardtanh({t}, -0.5, 0.5, True)", "F.leaky_relu({t}, 0.1, True)"]


@st.composite
def programs(draw) -> Program:
    kind = draw(st.sampled_from(["module", "function"]))
    module = kind == "module"
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float64]))
    k = draw(st.integers(2, 4))
    ndim = draw(st.sampled_from([2, 3]))
    shape = (draw(st.integers(1, 3)), k) if ndim == 2 else (draw(st.integers(1, 2)), draw(st.integers(1, 3)), k)
    n_slots = draw(st.integers(2, 5))
    style = draw(st.sampled_from(["clean", "model", "chain", "wild"]))
    # Chains need outputs of width K (a next group's input): make them common there.
    width_choices = [k, k, k, 2, 5] if style == "chain" else [1, 2, 3, k, 5]
    widths = tuple(draw(st.sampled_from(width_choices)) for _ in range(n_slots))
    biases = tuple(draw(st.booleans()) for _ in range(n_slots))
    tied: list = []
    if draw(st.integers(0, 3)) == 0:
        j = n_slots - 1
        same = [i for i in range(j) if widths[i] == widths[j]]
        if same:
            i = draw(st.sampled_from(same))
            what = draw(st.sampled_from(["weight", "module"]))
            if what == "module":
                biases = biases[:j] + (biases[i],)
            tied.append((what, j, i))
    requires_grad = draw(st.booleans())
    # "model": each linear has its own weight slot and that slot's bias, as in
    # real models (so the weights can live in one storage); "clean": the same
    # without edits or graph breaks; "chain": clean, with linears on member
    # outputs (groups in a chain), computed and shared weights; "wild": anything.
    next_slot = [0]

    def W(i):
        return f"self.l{i}.weight" if module else f"w{i}"

    def B(i):
        return f"self.l{i}.bias" if module else f"b{i}"

    body: list[str] = []
    sources = ["x"]  # tensors whose last dim is K, to read
    outs: list[tuple[str, int]] = []  # (name, width)
    derived: set[str] = set()
    region: list[str] = []  # a region to put the next linear in
    flags = {"writes_weights": False, "writes_input": False, "writes_output": False}

    if draw(st.booleans()):
        choices = VIEWS_OF_X[ndim] + FRESH_FROM_X
        choices += UNLISTED_SOURCES[ndim] if allowed("write_through_any_view") else []
        body.append(f"h = {draw(st.sampled_from(choices)).format(k=k)}")
        sources.append("h")

    def weight_expr(i: int) -> tuple[str, int]:
        """A weight expression on slot i and its width (out_features; 0: a
        1-D weight, a legal F.linear whose output has no last dim)."""
        form = draw(st.sampled_from(["plain"] * 4 + ["scaled", "tt", "sum", "rows", "dep", "cat", "clone", "vec"]))
        w, n = W(i), widths[i]
        if form == "vec":
            return f"{w}[0]", 0
        if form == "scaled":
            return f"({w} * 2)", n
        if form == "tt":
            return f"{w}.t().t()", n
        if form == "clone":
            return f"{w}.clone()", n
        if form == "sum":
            others = [j for j in range(n_slots) if widths[j] == n]
            return f"({w} + {W(draw(st.sampled_from(others)))})", n
        if form == "rows" and n > 1:
            r = draw(st.integers(1, n - 1))
            return f"{w}[:{r}]", r
        if form == "dep" and any(n >= 0 for _, n in outs):
            y = draw(st.sampled_from([y for y, n in outs if n >= 0]))
            return f"({w} * {y}.mean().tanh())", n
        if form == "cat":
            j = draw(st.integers(0, n_slots - 1))
            return f"torch.cat([{w}, {W(j)}])", n + widths[j]
        return w, n

    def bias_expr(n: int) -> str | None:
        """A bias for a weight expression of width n: none, a slot's, or computed."""
        choices = [i for i in range(n_slots) if biases[i] and widths[i] == n]
        form = draw(st.sampled_from(["none", "slot", "slot", "scaled", "broadcast"]))
        if n == 0:  # F.linear with a 1-D weight and a bias fails in eager too
            return None
        if form == "broadcast" and any(biases):  # shape [1]: legal, broadcast over n
            return f"{B(draw(st.sampled_from([i for i in range(n_slots) if biases[i]])))}[:1]"
        if form in ("none", "broadcast") or not choices:
            return None
        b = B(draw(st.sampled_from(choices)))
        return f"({b} * 2)" if form == "scaled" else b

    def linear() -> None:
        src = draw(st.sampled_from(sources))
        name = f"y{len(outs)}"
        form = draw(st.sampled_from(["F", "F", "module", "matmul", "addmm"]))
        if style != "wild":
            i = next_slot[0] % n_slots
            next_slot[0] += 1
            if src != "x" and style != "chain" and draw(st.booleans()):
                src = "x"
        else:
            i = draw(st.integers(0, n_slots - 1))
        pad = ""
        if region:
            body.append(f"with {region.pop()}:")
            pad = "    "
        if form == "module" and module:
            body.append(f"{pad}{name} = self.l{i}({src})")
            outs.append((name, widths[i] if not pad else -1))
            return
        if style in ("clean", "model") or (style == "chain" and draw(st.integers(0, 2)) > 0):
            w, n, b = W(i), widths[i], (B(i) if biases[i] else None)
        else:
            w, n = weight_expr(i)
            b = bias_expr(n)
        if form == "matmul" and n:
            line = f"{src} @ {w}.t()" + (f" + {b}" if b else "")
        elif form == "addmm" and b is not None and src == "x" and ndim == 2:
            line = f"torch.addmm({b}, {src}, {w}.t())"
        else:
            line = f"F.linear({src}, {w}" + (f", {b})" if b else ")")
        body.append(f"{pad}{name} = {line}")
        outs.append((name, n if not pad else -1))  # -1: maybe another dtype, not to reuse

    def write_input() -> None:
        targets = list(WRITES[ndim]) + (["h"] if "h" in sources else [])
        ops = list(WRITE_OPS)
        if allowed("write_through_any_view"):
            targets += UNLISTED_VIEWS[ndim]
        if allowed("positional_inplace"):
            ops += POSITIONAL_INPLACE
        body.append(draw(st.sampled_from(ops)).format(t=draw(st.sampled_from(targets))))
        flags["writes_input"] = True

    def write_weight() -> None:
        i = draw(st.integers(0, n_slots - 1))
        target = draw(st.sampled_from([W(i), f"{W(i)}[0]", f"{W(i)}.t()"] + ([B(i)] if biases[i] else [])))
        body.append("with torch.no_grad():")
        body.append(f"    {target}.{draw(st.sampled_from(['mul_(2)', 'add_(0.5)', 'zero_()']))}")
        flags["writes_weights"] = True

    def write_output() -> None:
        """(test_bug_inplace_on_member_output_with_grad, test_bug_duplicate_calls_share_an_output,
        and after a graph break test_bug_member_output_escapes)"""
        broken = "torch._dynamo.graph_break()" in body
        if outs and (allowed("member_output_escapes") or not broken):
            y, _ = draw(st.sampled_from(outs))
            body.append(f"{y}.{draw(st.sampled_from(['add_(1)', 'mul_(2)', 'relu_()']))}")
            flags["writes_output"] = True

    def chain() -> None:
        """A linear's output of width K as a source itself: its readers form a
        group on a member of another group (a chain)."""
        ok = [y for y, n in outs if n == k and y not in sources]
        if ok:
            sources.append(draw(st.sampled_from(ok)))

    def derive() -> None:
        """A new source from an output of width K: its readers are siblings too."""
        ok = [y for y, n in outs if n == k and y not in derived]
        if ok:
            y = draw(st.sampled_from(ok))
            derived.add(y)
            name = f"s{len(sources)}"
            body.append(f"{name} = torch.tanh({y})")
            sources.append(name)

    steps = ["linear"] * (6 if style == "wild" else 12) + ["derive", "chain"] + ["chain"] * 4 * (style == "chain")
    if style not in ("clean", "chain"):
        steps += ["write_input", "write_weight", "break"]
        if allowed("inplace_on_member_output_with_grad") and allowed("duplicate_calls_share_an_output"):
            steps.append("write_output")
        if allowed("region_boundary"):
            steps.append("region")
    n_linears = draw(st.integers(2, 6)) if style == "wild" else n_slots + draw(st.integers(0, 1))
    if style == "chain":
        n_linears = draw(st.integers(4, 8))  # slots wrap around: one weight read by several linears
    done = 0
    while done < n_linears:
        step = draw(st.sampled_from(steps))
        if step == "linear":
            linear()
            done += 1
        elif step == "break":  # at most one: each costs a compile of the rest of the frame
            if "torch._dynamo.graph_break()" not in body:
                body.append("torch._dynamo.graph_break()")
        elif step == "region":
            region[:] = [draw(st.sampled_from(REGIONS))]
        else:
            {"write_input": write_input, "write_weight": write_weight,
             "write_output": write_output, "derive": derive, "chain": chain}[step]()

    names = [y for y, _ in outs]
    ret = draw(st.sampled_from(["tuple", "sum", "flat", "some", "with_x"]))
    if ret == "tuple":
        returns = "(" + ", ".join(names) + ",)"
    elif ret == "sum":
        returns = " + ".join(f"{y}.sum()" for y in names)
    elif ret == "flat":
        # .view(-1) of a member's output: test_bug_view_of_member_output.
        views = ["view(-1)"] if allowed("view_of_member_output") else []
        flat = draw(st.sampled_from(["flatten()", "reshape(-1)"] + views))
        returns = "torch.cat([" + ", ".join(f"{y}.{flat}" for y in names) + "])"
    elif ret == "some":
        returns = f"{names[0]} * 2, {names[-1]}.relu()"
    else:
        returns = "(" + ", ".join(names) + ", x)"

    external = draw(st.sampled_from(
        ["none", "inplace", "replace", "load", "load_assign", "unfuse", "double"] if module
        else ["none", "inplace", "new"]))
    flip = draw(st.integers(0, 4)) == 0
    shape2 = draw(st.sampled_from([shape] * 4 + [(shape[0] + 1, *shape[1:])]))
    dynamic = draw(st.sampled_from([None] * 6 + [True, False]))
    noncontig = draw(st.integers(0, 4)) == 0
    caller_writes = allowed("member_output_escapes") and draw(st.integers(0, 3)) == 0
    options: dict = {}
    if draw(st.booleans()):
        options["training"] = draw(st.booleans())
    if draw(st.integers(0, 5)) == 0:
        options["weights"] = "cat"
    if draw(st.integers(0, 3)) == 0:
        options["min_group_size"] = 3
    return Program(kind, shape, dtype, widths, biases, tuple(tied), requires_grad, body, returns,
                   flags["writes_weights"], flags["writes_input"], flags["writes_output"],
                   external, flip, shape2, dynamic, noncontig, caller_writes, options)


# ------------------------------------------------------------ the harness

def _tensors(out) -> list:
    return [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]


def _state(fn, args) -> dict:
    """Every tensor a program may have written: x and the weights, by name."""
    d = {"x": args[0]}
    if isinstance(fn, nn.Module):
        d.update(fn.state_dict(keep_vars=True))
    else:
        d.update({f"arg{i}": a for i, a in enumerate(args[1:], 1)})
    return {k: v.detach() for k, v in d.items()}


def _grads(fn, args) -> dict:
    ts = dict(fn.named_parameters()) if isinstance(fn, nn.Module) else {f"arg{i}": a for i, a in enumerate(args)}
    ts["x"] = args[0]
    grads = {k: v.grad for k, v in ts.items()}
    if not allowed("unused_member_gets_no_grad"):  # zeros where eager has None
        grads = {k: torch.zeros_like(ts[k]) if g is None else g for k, g in grads.items()}
    return grads


def _external_edit(prog: Program, fn, args, compiled_side: bool):
    """The same edit from outside, on each side; returns the new args."""
    e = prog.external
    if isinstance(fn, nn.Module):
        if e == "inplace":
            with torch.no_grad():
                for p in fn.parameters():
                    p.add_(0.25)
        elif e == "replace":
            fn.l0.weight = nn.Parameter(fn.l0.weight.detach() + 1, requires_grad=prog.requires_grad)
        elif e in ("load", "load_assign"):
            sd = {k: (v.detach() - 0.5).requires_grad_(prog.requires_grad) for k, v in fn.state_dict().items()}
            fn.load_state_dict(sd, assign=e == "load_assign")
        elif e == "unfuse" and compiled_side:
            fxfuse.unfuse(fn)  # a no-op for the program's results
        elif e == "double":  # a recompile, which fuses the new tensors afresh
            fn.double()
            return (args[0].detach().double().requires_grad_(args[0].requires_grad),)
        return args
    if e == "inplace":
        with torch.no_grad():
            for w in {id(w): w for w in args[1:]}.values():
                w.add_(0.25)
    elif e == "new":  # new tensors; a tied weight stays tied
        new = {id(w): (w.detach() * -1).requires_grad_(w.requires_grad) for w in args[1:]}
        return (args[0], *[new[id(w)] for w in args[1:]])
    return args


def check(prog: Program, grad: bool, example_seed: int) -> None:
    torch._dynamo.reset()
    first_grad = grad
    fn, args = prog.make(example_seed)
    ref_fn, ref_args = copy.deepcopy((fn, args))
    if grad and not prog.writes_input:
        args[0].requires_grad_(True)
        ref_args[0].requires_grad_(True)
    be = fxfuse.backend(inner="eager", **prog.options)
    compiled = torch.compile(fn, backend=be, dynamic=prog.dynamic)

    def call(f, a):
        with torch.set_grad_enabled(grad):
            if f is ref_fn:
                return f(*a)
            try:
                return f(*a)
            except Exception as e:  # noqa: BLE001
                error = "".join(traceback.format_exception(e)[-6:])
            # Raised here, outside the handler: the generated graph's code has
            # a new name per compile, and hypothesis would take each for
            # another bug ("FlakyFailure") and print no example.
            raise AssertionError(f"the compiled program raised:\n{error}")

    ref = call(ref_fn, ref_args)  # eager first: an error there is the generator's
    out = call(compiled, args)
    torch.testing.assert_close(_tensors(out), _tensors(ref), msg=lambda m: f"first call: {m}")
    torch.testing.assert_close(_state(fn, args), _state(ref_fn, ref_args), msg=lambda m: f"state after: {m}")
    if grad:
        _check_backward(out, ref, fn, args, ref_fn, ref_args)
    if prog.caller_writes:
        _check_caller_write(out, ref, grad)

    # Second call: a new x (needing grad as the first did: no recompile for that).
    x2 = torch.randn(prog.shape2, generator=torch.Generator().manual_seed(example_seed + 1)).to(prog.dtype)
    x2.requires_grad_(args[0].requires_grad)
    args = _external_edit(prog, fn, (x2.detach().clone().requires_grad_(x2.requires_grad), *args[1:]), True)
    ref_args = _external_edit(prog, ref_fn, (x2, *ref_args[1:]), False)
    if prog.flip and prog.grad_ok:  # e.g. inference (weights in one storage), then training
        grad = not grad
    ref = call(ref_fn, ref_args)
    out = call(compiled, args)
    torch.testing.assert_close(_tensors(out), _tensors(ref), msg=lambda m: f"second call: {m}")
    torch.testing.assert_close(_state(fn, args), _state(ref_fn, ref_args), msg=lambda m: f"state after 2: {m}")

    r = be.report
    assert r.errors == [], r.errors
    assert "error_in_pass" not in r.skipped
    assert r.after == r.before - r.removed and r.graphs >= 1
    # `pytest --hypothesis-show-statistics` shows how often each path ran.
    event("grad" if first_grad else "no_grad")
    event("fused" if r.removed else "nothing fused")
    event(f"graphs: {min(r.graphs, 3)}")
    for w in {g.weights for g in r.groups}:
        event(f"group weights: {w}")
    for reason in r.skipped:
        event(f"skipped: {reason}")


def _check_caller_write(out, ref, grad: bool) -> None:
    """The caller writes the first output in place: the others must not change
    (in eager they are distinct tensors), nor may the write raise."""
    outs, refs = _tensors(out), _tensors(ref)
    with torch.set_grad_enabled(grad):
        try:
            refs[0].add_(1)
        except RuntimeError:
            return  # eager cannot either (a leaf that requires grad)
        outs[0].add_(1)
    torch.testing.assert_close(outs, refs, msg=lambda m: f"after the caller wrote out[0]: {m}")


def _check_backward(out, ref, fn, args, ref_fn, ref_args) -> None:
    outs, refs = _tensors(out), _tensors(ref)
    if not any(t.requires_grad for t in refs):
        return
    try:
        sum(t.sum() for t in refs if t.requires_grad).backward()
    except RuntimeError:
        return  # eager cannot either (a tensor saved for backward was written in place)
    sum(t.sum() for t in outs if t.requires_grad).backward()
    torch.testing.assert_close(_grads(fn, args), _grads(ref_fn, ref_args), msg=lambda m: f"gradients: {m}")


_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _fuzz(prog: Program, example_seed: int, run_seed: int) -> None:
    note(f"replay the run: FXFUSE_FUZZ_SEED={run_seed} FXFUSE_FUZZ_EXAMPLES={EXAMPLES}")
    note("program:\n" + prog.source())
    if re.search(r"\(y\d+[,)]|y\d+ @", "\n".join(prog.body)):
        event("a linear reads a linear's output")
    check(prog, grad=False, example_seed=example_seed)
    if prog.grad_ok and prog.grad_matters:
        check(prog, grad=True, example_seed=example_seed)


@seed(SEED)
@_SETTINGS
@given(prog=programs(), example_seed=st.integers(0, 2**16))
def test_fuzz_backend_matches_eager(prog, example_seed):
    """A fresh seed each run (or FXFUSE_FUZZ_SEED): new programs every time."""
    _fuzz(prog, example_seed, SEED)


@seed(FIXED_SEED)
@_SETTINGS
@given(prog=programs(), example_seed=st.integers(0, 2**16))
def test_fuzz_fixed_seed(prog, example_seed):
    """The same programs every run: a change that breaks one fails every time."""
    _fuzz(prog, example_seed, FIXED_SEED)


# ------------------------------------------------------------ bugs found
#
# Minimal reproductions of what this fuzzer found, one per bug (a bug's name
# is its test's name less "test_bug_"). Open ones (OPEN_BUGS) are strict
# xfails; the fixed ones guard their fix.

def _compare(f, *args, grad=False, **options):
    """eager vs fxfuse(inner="eager") on fresh copies of args (aliasing kept
    out): equal outputs, no error in the report. Returns the report."""
    def fresh():
        return [a.detach().clone().requires_grad_(a.requires_grad) for a in args]

    with torch.set_grad_enabled(grad):
        ref = f(*fresh())
        be = fxfuse.backend(inner="eager", **options)
        out = torch.compile(f, backend=be)(*fresh())
    torch.testing.assert_close(out, ref)
    assert [(t.dtype, t.requires_grad) for t in _tensors(out)] == [(t.dtype, t.requires_grad) for t in _tensors(ref)]
    assert be.report.errors == []
    return be.report


def _xw(k=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, k, generator=g), torch.randn(3, k, generator=g), torch.randn(3, k, generator=g)


# A write through a view made by a function that was missing from the
# allow-list legality._VIEW_FUNCTIONS was not seen as a write to x: the two
# linears were fused before the write and the second read the old x.
ANY_VIEW = {
    "x.T": lambda x: x.T,
    "x.mT": lambda x: x.mT,
    "x.data": lambda x: x.data,
    "torch.moveaxis": lambda x: torch.moveaxis(x, 0, 1),
    "torch.swapdims": lambda x: torch.swapdims(x, 0, 1),
    "torch.ravel": lambda x: torch.ravel(x),
    "torch.unflatten": lambda x: torch.unflatten(x, -1, (2, 2)),
    "torch.tensor_split": lambda x: torch.tensor_split(x, 2)[0],
    "torch.hsplit": lambda x: torch.hsplit(x, 2)[0],
    "torch.broadcast_to": lambda x: torch.broadcast_to(x, (1, *x.shape))[0],
    "torch.adjoint": lambda x: torch.adjoint(x),
    "torch.real": lambda x: torch.real(x),
    "torch.atleast_3d": lambda x: torch.atleast_3d(x),
    "aten.alias": lambda x: torch.ops.aten.alias(x),
    "F.dropout(training=False)": lambda x: F.dropout(x, 0.5, False),
}


@bug("write_through_any_view", "a write through a view made by a function not in "
     "legality._VIEW_FUNCTIONS is not seen; the siblings are fused across it")
@pytest.mark.parametrize("view", list(ANY_VIEW))
def test_bug_write_through_any_view(view):
    make_view = ANY_VIEW[view]

    def f(x, w0, w1):
        a = F.linear(x, w0)
        make_view(x).add_(1)  # writes x
        b = F.linear(x, w1)
        return a, b

    _compare(f, *_xw())


# Graph inputs that alias each other (x and a view of x, a weight and a view of
# it, passed as two arguments) looked unrelated to the alias analysis.
@bug("aliasing_graph_inputs", "placeholders that alias each other are treated as independent")
@pytest.mark.parametrize("written", ["input", "weight"])
def test_bug_aliasing_graph_inputs(written):
    def f(x, w0, w1, alias):
        a = F.linear(x, w0)
        alias.mul_(2)  # x.view(-1) or w1.view(-1): writes x or w1
        b = F.linear(x, w1)
        return a, b

    x, w0, w1 = _xw()

    def run(fn):
        xx, ww0, ww1 = x.clone(), w0.clone(), w1.clone()
        return fn(xx, ww0, ww1, (xx if written == "input" else ww1).view(-1))

    ref = run(f)
    be = fxfuse.backend(inner="eager")
    torch.testing.assert_close(run(torch.compile(f, backend=be)), ref)
    assert be.report.errors == []


# `inplace` was read from the keyword arguments only.
@bug("positional_inplace", "an inplace=True passed by position (F.relu(x, True)) is not seen as a write")
@pytest.mark.parametrize("op", ["relu", "hardtanh", "leaky_relu", "elu"])
def test_bug_positional_inplace(op):
    call = {
        "relu": lambda x: F.relu(x, True),
        "hardtanh": lambda x: F.hardtanh(x, -0.5, 0.5, True),
        "leaky_relu": lambda x: F.leaky_relu(x, 0.1, True),
        "elu": lambda x: F.elu(x, 1.0, True),
    }[op]

    def f(x, w0, w1):
        a = F.linear(x, w0)
        call(x)
        b = F.linear(x, w1)
        return a, b

    x, w0, w1 = _xw()
    _compare(f, x - 0.3, w0, w1)


# A member's output becomes a column slice of the fused output, which is not
# contiguous, so code that is legal in eager (`.view(-1)`) first raised at run
# time; then the rewrite failed on it ("error_in_pass", a warning: correct but
# unfused); and where the weights had gone into one storage (no_grad, or
# frozen weights) the undone rewrite left the storage inputs behind, so the
# call raised TypeError ("forward() takes 4 positional arguments but 5 were
# given"). Now a .contiguous() is inserted where the view needs one. At first
# not when a dim of the input was 1 (x of [2, 1, 4], a decode step): the fake
# view accepted the piece [2, 1, 2] with strides (5, 5, 1) while the real one
# raised "view size is not compatible with input tensor's size and stride";
# the check now views a meta tensor of the piece's layout.
@pytest.mark.parametrize("path", ["storage", "cat"])
@pytest.mark.parametrize("shape", [
    pytest.param((2, 4), id="2x4"), pytest.param((2, 3, 4), id="2x3x4"),
    pytest.param((2, 1, 4), id="2x1x4", marks=bug("view_of_member_output", "a .view(-1) of a member's output "
                                      "raises when a dim of the input is 1 (x of [2, 1, 4])")),
])
def test_bug_view_of_member_output(path, shape):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 2, bias=False), nn.Linear(4, 3, bias=False)

        def forward(self, x):
            return self.a(x).view(-1), self.b(x)

    m, x = M(), torch.randn(shape)
    be = fxfuse.backend(inner="eager", **({"weights": "cat"} if path == "cat" else {}))
    with torch.no_grad():
        ref = m(x)
        out = torch.compile(m, backend=be)(x)
    torch.testing.assert_close(out, ref)
    assert be.report.errors == []


# The pieces come from one torch.split, whose outputs autograd forbids writing
# in place; eager allows it. Hit with frozen weights (no training option
# needed) as soon as the input requires grad, e.g. LoRA-style fine-tuning.
@bug("inplace_on_member_output_with_grad", "writing a fused member's output in place raises "
     "under autograd ('Output 0 of SplitWithSizes is a view ...')")
def test_bug_inplace_on_member_output_with_grad():
    def f(x, w0, w1):
        q = F.linear(x, w0)
        k = F.linear(x, w1)
        q.mul_(2)
        return q, k

    x, w0, w1 = _xw()
    _compare(f, x.requires_grad_(), w0, w1, grad=True)


# With training=True a member whose output does not reach the loss (here: is
# dead, which Dynamo keeps in the graph) still took part in the cat, so its
# weight's .grad was zeros where eager leaves None (optimizers then apply
# weight decay and momentum to it).
@bug("unused_member_gets_no_grad", "training=True gives an unused member's weight a zero .grad "
     "where eager gives None")
def test_bug_unused_member_gets_no_grad():
    def f(x, w0, w1):
        used = F.linear(x, w0)
        F.linear(x, w1)  # dead
        return used

    x, w0, w1 = _xw()
    w0.requires_grad_(), w1.requires_grad_()
    torch.compile(f, backend=fxfuse.backend(inner="eager", training=True))(x, w0, w1).sum().backward()
    assert w1.grad is None, w1.grad


# Exact duplicate calls (same input, weight and bias) were computed once and
# every duplicate got the same tensor, so writing one output in place changed
# the others; in eager they are distinct tensors.
@bug("duplicate_calls_share_an_output", "duplicate linear calls share one output tensor")
def test_bug_duplicate_calls_share_an_output():
    def f(x, w):
        a = F.linear(x, w)
        b = F.linear(x, w)
        a.add_(1)
        return a, b

    x, w, _ = _xw()
    _compare(f, x, w)


# Siblings on both sides of an autocast region were fused: the member inside
# the region was computed outside it (float32 for bfloat16) or the other way
# round. The same across a grad-mode region: a member computed under
# torch.no_grad() got requires_grad, or one computed with grad lost it, so
# backward raised or gradients were silently missing. Default options, frozen
# weights.
@bug("region_boundary", "siblings are fused across an autocast or grad-mode region boundary")
@pytest.mark.parametrize("region", ["autocast", "no_grad", "enable_grad"])
def test_bug_region_boundary(region):
    ctx = {
        "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
        "no_grad": torch.no_grad,
        "enable_grad": torch.enable_grad,
    }[region]

    def f(x, w0, w1):
        with ctx():
            a = F.linear(x, w0)
        b = F.linear(x, w1)
        return a, b

    x, w0, w1 = _xw()
    if region == "enable_grad":
        with torch.no_grad():
            _compare(f, x.requires_grad_(), w0, w1)
    else:
        _compare(f, x.requires_grad_(region == "no_grad"), w0, w1, grad=True)


# A weight of shape [1, K] made by a transpose has strides (1, 1) and counts as
# contiguous; moving it into a storage gave it strides (K, 1), and Dynamo's
# guard on the parameter failed on the frame that created it ("Guard failed on
# the same frame it was created", an AssertionError out of torch.compile).
@bug("storage_keeps_parameter_strides", "storage adoption changes a parameter's strides; "
     "Dynamo's guard then fails on the same frame")
def test_bug_storage_keeps_parameter_strides():
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 1, bias=False), nn.Linear(4, 1, bias=False)
            self.a.weight = nn.Parameter(torch.randn(4, 1).t())  # [1, 4], strides (1, 1)

        def forward(self, x):
            return self.a(x), self.b(x)

    m, x = Heads(), torch.randn(2, 4)
    be = fxfuse.backend(inner="eager")
    with torch.no_grad():
        ref = m(x)
        for _ in range(2):
            torch.testing.assert_close(torch.compile(m, backend=be)(x), ref)
    assert be.report.errors == []


# The checks on members' outputs (written in place, duplicates) see only the
# graph being compiled. An output that leaves it, returned to the caller or
# passed on across a graph break, is still a piece of one torch.split (with
# autograd: writing it in place raises) or, for duplicates, one tensor
# returned twice (writing one changes the other; `a is b`). After a graph
# break the write even fails Dynamo's trace of the next graph. (The cases with
# grad are refused as "output_leaves_graph_with_grad"; a repeated call whose
# output and its original's are both returned stays its own call,
# "repeated_call_output_leaves_graph".)
@pytest.mark.parametrize("case", [
    "caller_writes_with_grad",
    pytest.param("duplicates_returned", marks=bug(
        "member_output_escapes", "duplicate calls whose output leaves the graph under no_grad are "
        "returned as one tensor: writing one changes the other")),
    "graph_break",
])
def test_bug_member_output_escapes(case):
    x, w0, w1 = _xw()
    if case == "duplicates_returned":
        def f(x, w0, w1):
            return F.linear(x, w0), F.linear(x, w0)
    elif case == "caller_writes_with_grad":
        def f(x, w0, w1):
            return F.linear(x, w0), F.linear(x, w1)
        x.requires_grad_()
    else:
        def f(x, w0, w1):
            q = F.linear(x, w0)
            k = F.linear(x, w1)
            torch._dynamo.graph_break()
            q.mul_(2)
            return q, k
        x.requires_grad_()

    with torch.set_grad_enabled(case != "duplicates_returned"):  # duplicates: inference
        ref = f(x, w0, w1)
        out = torch.compile(f, backend=fxfuse.backend(inner="eager"))(x, w0, w1)
    if case != "graph_break":  # the caller writes the first output
        ref[0].add_(1)
        out[0].add_(1)
    torch.testing.assert_close(out, ref)


# Pieces of the fused output handed on across a graph break kept the fused
# output's strides: the next graph's `.view(-1)` of one (legal on the member's
# own contiguous output) raised while Dynamo traced it. Pieces that leave the
# graph are now contiguous copies.
@pytest.mark.parametrize("path", ["storage", "cat"])
def test_bug_piece_viewed_after_graph_break(path):
    def f(x, w0, w1):
        a = F.linear(x, w0)
        b = F.linear(x, w1)
        torch._dynamo.graph_break()
        return torch.cat([a.view(-1), b.view(-1)])

    x, w0, w1 = _xw()
    with torch.no_grad():
        ref = f(x, w0, w1)
        be = fxfuse.backend(inner="eager", **({"weights": "cat"} if path == "cat" else {}))
        out = torch.compile(f, backend=be)(x, w0, w1)
    torch.testing.assert_close(out, ref)
    assert be.report.removed == 1 and be.report.errors == []
