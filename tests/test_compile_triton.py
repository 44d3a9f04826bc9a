"""``torch.compile`` through the Triton implementations (docs/design.md §4.2).

The host launchers of the four ops' Triton kernels are opaque torch ops
(``torch.ops.rag_kernels.<op>_fwd_triton`` / ``<op>_bwd_triton``, ``registry.launcher_op``) with
fake implementations, so a compiled function that calls the public ops with ``impl="triton"``
traces into one graph — ``fullgraph=True`` raises on any graph break — and, with
``dynamic=True``, that one graph serves every shape: the block sizes, ``bit_length`` autotune
buckets, grids and chunk loops run inside the ops on real sizes, never on SymInts.

Each case compiles with ``backend=AotEagerAndRecordGraphs()`` (aot_eager that keeps the
dynamo, forward and backward graphs), runs two different shapes forward and backward, and
checks: compiled outputs and gradients equal the eager call's; one dynamo graph, one forward
and one backward graph for both shapes (no break, no recompile); the launcher ops are the
nodes of those graphs. ``torch.library.opcheck`` then checks each op's schema, its fake
against the real op (also under ``aot_dispatch_dynamic``) and its autograd registration.

On CPU the kernels run under ``TRITON_INTERPRET=1``; on a CUDA machine without the
interpreter the same tests compile the GPU path.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest does too)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from functorch.compile import make_boxed_func  # noqa: E402
from torch._dynamo.backends.common import aot_autograd  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import rag_kernels as rk  # noqa: E402
from rag_kernels.ops import registry  # noqa: E402
from toolkit import (  # noqa: E402
    IGNORE,
    make_contrastive,
    make_marginalize,
    make_rag,
    make_token_smoothing,
)

OPS = ("linear_logprob", "token_smoothing", "marginalize", "contrastive")
_WHY = [f"{op}: {r}" for op in OPS if (r := registry.unavailable_reason(op, "triton"))]
if _WHY:
    pytest.skip(f"impl='triton' unavailable ({'; '.join(_WHY)})", allow_module_level=True)

DEV = "cuda" if torch.cuda.is_available() and not registry.triton_interpret() else "cpu"
F32 = torch.float32


class AotEagerRecorder:
    """``backend="aot_eager"`` that keeps the forward and backward graphs AOT autograd traced."""

    def __init__(self):
        self.fw_graphs, self.bw_graphs = [], []

    def __call__(self, gm, example_inputs):
        def keep(graphs):
            def compiler(g, _inputs):
                graphs.append(g)
                return make_boxed_func(g.forward)

            return compiler

        backend = aot_autograd(fw_compiler=keep(self.fw_graphs), bw_compiler=keep(self.bw_graphs))
        return backend(gm, example_inputs)


def _grad_leaves(args):
    """Fresh leaves for the float tensors of ``args`` that require grad (others as they are)."""
    return [
        a.detach().clone().requires_grad_()
        if isinstance(a, torch.Tensor) and a.requires_grad
        else a
        for a in args
    ]


def _value_and_grads(fn, args):
    """``fn(*args)`` and the gradients of ``sum(out * u)`` (a fixed non-uniform ``u``) with
    respect to every argument that requires grad."""
    leaves = _grad_leaves(args)
    out = fn(*leaves)
    u = torch.linspace(-1.0, 2.0, out.numel(), device=out.device).view(out.shape)
    grads = torch.autograd.grad((out * u.to(out.dtype)).sum(), [a for a in leaves if _rg(a)])
    return [out.detach(), *grads]


def _rg(a) -> bool:
    return isinstance(a, torch.Tensor) and a.requires_grad


def _on(x, requires_grad=False):
    if x is None:
        return None
    x = x.detach().to(DEV)
    return x.requires_grad_() if requires_grad else x


def compiles_once(fn, cases, fwd_ops, bwd_ops=()):
    """Compile ``fn`` (``fullgraph=True, dynamic=True``, aot_eager) and run every case of
    ``cases`` (argument tuples of different shapes) forward and backward: results equal the
    eager call's; one graph of each kind for all cases; the named launcher ops in them."""
    torch._dynamo.reset()
    counters.clear()
    backend = AotEagerRecorder()
    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=True)
    for i, args in enumerate(cases):
        expected = _value_and_grads(fn, args)
        actual = _value_and_grads(compiled, args)
        for j, (a, e) in enumerate(zip(actual, expected, strict=True)):
            what = "output" if j == 0 else f"gradient {j}"
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6, msg=f"case {i}, {what}")
    # One dynamo graph for all shapes: no graph break (fullgraph=True would raise) and no
    # recompile; AOT autograd traced one forward and one backward graph from it.
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert len(backend.fw_graphs) == 1 and len(backend.bw_graphs) == 1, (
        f"{len(backend.fw_graphs)} forward / {len(backend.bw_graphs)} backward graphs"
    )
    fw, bw = backend.fw_graphs[0], backend.bw_graphs[0]
    symbolic = [
        n for n in fw.graph.nodes
        if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.SymInt)
    ]  # fmt: skip
    assert symbolic, "the graph has no symbolic sizes: dynamic=True did not take effect"
    fw, bw = fw.code, bw.code
    for name in fwd_ops:
        assert f"rag_kernels.{name}" in fw, f"{name} is not a node of the forward graph"
    for name in bwd_ops:
        assert f"rag_kernels.{name}" in bw, f"{name} is not a node of the backward graph"


# ------------------------------------------------------------------------- compiled ops


def _llp_case(B, T, H, V, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) / H**0.5
    b = torch.randn(V, generator=g) * 0.5
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, 0] = IGNORE
    return _on(h, True), _on(w, True), _on(y), _on(b, True)


def test_linear_logprob_compiles_to_one_graph():
    """``lp``, ``lse`` and ``sum_logprob`` (all three upstream gradients), bias, softcap and an
    ignored row; N = B T rows vary between the cases."""

    def fn(h, w, y, b):
        st = rk.linear_logprob(h, w, y, bias=b, softcap=5.0, return_stats=True, impl="triton")
        return torch.stack([st.logprob, st.lse, st.sum_logprob])

    cases = [_llp_case(2, 3, 16, 40, 0), _llp_case(3, 5, 24, 56, 1)]
    compiles_once(fn, cases, ["linear_logprob_fwd_triton"], ["linear_logprob_bwd_triton"])


def _ts_case(B, K, T, H, V, seed):
    c = make_token_smoothing(B, K, T, H, V, dtype=F32, bias=True, doc_mask=True, seed=seed)
    return (
        _on(c.hidden, True), _on(c.weight, True), _on(c.doc_scores, True), _on(c.bias, True),
        _on(c.doc_mask),
    )  # fmt: skip


def test_token_smoothing_compiles_to_one_graph():
    def fn(h, w, s, b, dm):
        return rk.token_smoothing(h, w, s, bias=b, doc_mask=dm, impl="triton")

    cases = [_ts_case(2, 3, 5, 16, 40, 0), _ts_case(3, 4, 7, 24, 56, 1)]
    compiles_once(fn, cases, ["token_smoothing_fwd_triton"], ["token_smoothing_bwd_triton"])


@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_marginalize_compiles_to_one_graph(mode):
    loss = rk.rag_sequence_loss if mode == "sequence" else rk.rag_token_loss

    def fn(lp, s, tm, dm):
        return loss(lp, s, token_mask=tm, doc_mask=dm, reduction="none", impl="triton")

    cases = []
    for (B, K, T), seed in (((2, 3, 5), 0), ((3, 4, 7), 1)):
        c = make_marginalize(B, K, T, dtype=F32, seed=seed)
        cases.append(
            (_on(c.token_logprobs, True), _on(c.doc_scores, True), _on(c.token_mask),
             _on(c.doc_mask))
        )  # fmt: skip
    compiles_once(fn, cases, ["marginalize_fwd_triton"])


@pytest.mark.parametrize("mode", ["index-ids-symmetric", "mask-ids"])
def test_contrastive_compiles_to_one_graph(mode):
    """Doc ids (duplicates: false negatives) with index positives and the symmetric (column)
    direction, or with a positives mask (the id table has static shapes: no host read); a
    learnable scale (its gradient comes from the backward op too)."""
    symmetric = mode != "mask-ids"

    def fn(q, d, pos, ids, scale):
        return rk.contrastive_loss(
            q, d, pos, scale=scale, doc_ids=ids, symmetric=symmetric, reduction="none",
            impl="triton",
        )  # fmt: skip

    cases = []
    for (B, M, D), seed in (((5, 9, 8), 0), ((6, 11, 12), 1)):
        c = make_contrastive(
            B, M, D, dtype=F32, positives=mode.split("-")[0], doc_ids=True, seed=seed
        )  # fmt: skip
        scale = torch.tensor(10.0)
        cases.append(
            (_on(c.queries, True), _on(c.docs, True), _on(c.positives), _on(c.doc_ids),
             _on(scale, True))
        )  # fmt: skip
    compiles_once(fn, cases, ["contrastive_fwd_triton"], ["contrastive_bwd_triton"])


@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_rag_loss_compiles_to_one_graph(mode):
    """``rk.rag_loss`` end to end with label smoothing: sequence mode runs the fused LM head
    (with statistics) and two marginalisations, token mode the token-smoothing op (which also
    gives the target log-probs) and one."""

    def fn(h, w, y, s, dm):
        return rk.rag_loss(
            h, w, y, s, mode=mode, label_smoothing=0.1, doc_mask=dm, reduction="none",
            impl="triton",
        )  # fmt: skip

    cases = []
    for (B, K, T, H, V), seed in (((2, 3, 5, 16, 40), 0), ((3, 4, 7, 24, 56), 1)):
        c = make_rag(B, K, T, H, V, dtype=F32, seed=seed)
        cases.append(
            (_on(c.hidden, True), _on(c.weight, True), _on(c.target), _on(c.doc_scores, True),
             _on(c.doc_mask))
        )  # fmt: skip
    # the LM-head op is the Triton one; the marginalisation takes its own best implementation
    # (rag_loss's impl selects the LM-head kernel): C++ on CPU tensors, Triton on CUDA ones,
    # the reference (plain torch ops, no op node) on CPU tensors without the C++ extension
    lm_head = "linear_logprob" if mode == "sequence" else "token_smoothing"
    marg = ["marginalize_fwd"] if DEV == "cuda" or registry.cpu_available() else []
    compiles_once(fn, cases, [f"{lm_head}_fwd_triton", *marg], [f"{lm_head}_bwd_triton"])


def test_first_call_of_an_op_may_come_from_a_compiled_function(monkeypatch):
    """The registry loads a kernel module the first time an implementation is asked for; when
    that happens while dynamo traces, ``registry._import`` runs eagerly (``importlib`` cannot be
    traced) and the ``fullgraph=True`` trace goes on. A fresh registry entry stands for a
    process that never called the op."""
    op = registry._OPS["marginalize"]
    monkeypatch.setitem(registry._OPS, "marginalize", registry._Op(op.package, op.impls))
    torch._dynamo.reset()
    backend = AotEagerRecorder()
    compiled = torch.compile(
        lambda lp, s: rk.rag_sequence_loss(lp, s, impl="triton"), backend=backend, fullgraph=True
    )
    c = make_marginalize(2, 3, 5, dtype=F32)
    lp, s = _on(c.token_logprobs), _on(c.doc_scores)
    torch.testing.assert_close(compiled(lp, s), rk.rag_sequence_loss(lp, s, impl="triton"))
    assert "triton" in registry._OPS["marginalize"].modules
    assert "rag_kernels.marginalize_fwd_triton" in backend.fw_graphs[0].code


# ------------------------------------------------------------------------------ opcheck


def _opcheck(name, args):
    """``torch.library.opcheck`` with inputs that do not require grad: the launcher ops have
    no autograd formula of their own (the op's autograd Function calls the forward and the
    backward op), so ``test_autograd_registration`` checks that no autograd kernel claims to
    differentiate them; the other checks (schema, fake vs real, aot_dispatch_dynamic) run."""
    op = getattr(torch.ops.rag_kernels, name).default
    result = torch.library.opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result


def test_opcheck_marginalize():
    c = make_marginalize(2, 3, 5, dtype=F32)
    lp, s, tm, dm = (_on(x) for x in c)
    for token_mode in (False, True):
        _opcheck("marginalize_fwd_triton", (lp, s, tm, dm, token_mode))
    _opcheck("marginalize_fwd_triton", (lp, s, None, None, True))


@pytest.mark.parametrize("mode", ["index-ids", "mask-ids"])
def test_opcheck_contrastive(mode):
    from rag_kernels.ops.contrastive import triton as tk
    from rag_kernels.ops.contrastive.reference import positive_id_table

    B, M, D = 5, 9, 8
    c = make_contrastive(B, M, D, dtype=F32, positives=mode.split("-")[0], doc_ids=True)
    q, d = (_on(F.normalize(x, dim=-1)) for x in (c.queries, c.docs))
    scale = _on(torch.tensor(10.0))
    pos_index = pos_mask = table = None
    ids = _on(c.doc_ids)
    if mode == "mask-ids":
        pos_mask = _on(c.positives)
        table, ids = positive_id_table(pos_mask, ids)
    else:
        pos_index = _on(c.positives)
    args = (q, d, scale, pos_index, pos_mask, ids, table)
    _opcheck("contrastive_fwd_triton", args)
    _, lse, plse = tk.forward(*args)
    grad = _on(c.weights.float())
    for needs in ((True, True, True), (False, True, False)):
        _opcheck("contrastive_bwd_triton", (*args, lse, plse, grad, *needs))


def test_opcheck_linear_logprob():
    from rag_kernels.ops.linear_logprob import make_options
    from rag_kernels.ops.linear_logprob import triton as tk

    h, w, y, b = (x.detach() for x in _llp_case(2, 3, 16, 40, 0))
    h, y = h.reshape(-1, 16), y.reshape(-1)
    _opcheck("linear_logprob_fwd_triton", (h, w, y, b, IGNORE, 5.0, None))
    _opcheck("linear_logprob_fwd_triton", (h, w, y, None, IGNORE, None, None))
    _, lse, _ = tk.forward(h, w, y, b, make_options(IGNORE, 5.0))
    g = torch.linspace(-1, 1, h.shape[0], device=DEV)
    for variant in ("deterministic", "atomic"):
        bwd = (h, w, y, b, lse, g, g.flip(0), 0.5 * g, IGNORE, 5.0, None, variant)
        _opcheck("linear_logprob_bwd_triton", (*bwd, True, True, True))
    _opcheck(
        "linear_logprob_bwd_triton",
        (h, w, y, None, lse, g, None, None, IGNORE, 5.0, None, None, False, True, True),
    )


def test_opcheck_token_smoothing():
    from rag_kernels.ops.token_smoothing import TokenSmoothingOptions, log_prior_of
    from rag_kernels.ops.token_smoothing import triton as tk

    c = make_token_smoothing(2, 3, 5, 16, 40, dtype=F32, bias=True, doc_mask=True)
    h, w, b = _on(c.hidden), _on(c.weight), _on(c.bias)
    pi = log_prior_of(_on(c.doc_scores), _on(c.doc_mask), F32)
    y = torch.randint(0, 40, (2, 5), device=DEV)
    y[0, 0] = -1
    _opcheck("token_smoothing_fwd_triton", (h, w, pi, b, y, 5.0, None))
    _opcheck("token_smoothing_fwd_triton", (h, w, pi, None, None, None, None))
    _, lse, wsum, _ = tk.forward(h, w, pi, b, y, TokenSmoothingOptions(softcap=5.0))
    g = torch.linspace(-1, 1, 10, device=DEV).view(2, 5)
    glp = torch.linspace(-1, 1, 30, device=DEV).view(2, 3, 5)
    for variant in ("deterministic", "atomic"):
        bwd = (h, w, pi, b, y, lse, wsum, g, glp, 5.0, variant)
        _opcheck("token_smoothing_bwd_triton", (*bwd, True, True, True))
    _opcheck(
        "token_smoothing_bwd_triton",
        (h, w, pi, None, None, lse, wsum, g, None, 5.0, None, True, False, True),
    )


def test_launcher_ops_are_not_differentiable_on_their_own():
    """Called outside its autograd Function with inputs that require grad, a launcher op
    raises on backward (loud), rather than returning a wrong or missing gradient."""
    c = make_marginalize(2, 3, 5, dtype=F32)
    lp = _on(c.token_logprobs, True)
    loss, _, _ = torch.ops.rag_kernels.marginalize_fwd_triton(
        lp, _on(c.doc_scores), None, None, False
    )
    with pytest.raises(RuntimeError, match="no autograd formula"):
        loss.sum().backward()
