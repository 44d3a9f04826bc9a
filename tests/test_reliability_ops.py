"""Regression tests for the ops' crash / NaN-policy / empty-input findings (one test per
finding, every implementation that can run here; Triton under TRITON_INTERPRET=1)."""

import subprocess
import sys
import textwrap

import pytest
import torch

import rag_kernels as rk
from toolkit import assert_close, impl_params

LLP = impl_params("linear_logprob")
MARG = impl_params("marginalize")
TS = impl_params("token_smoothing")
NAN = float("nan")


def _grads(loss, *xs):
    return torch.autograd.grad(loss, [x for x in xs if x is not None], allow_unused=True)


# ------------------------------------------------------------------ crashes, failing backward


@pytest.mark.parametrize("impl", LLP)
def test_empty_batch_with_shared_target_does_not_kill_the_process(impl):
    """B = 0 with a target shared over K divided by a zero size in the C++ kernel (SIGFPE):
    run it in a subprocess so a crash fails this test instead of killing pytest."""
    code = textwrap.dedent(
        f"""
        import os, torch
        import rag_kernels as rk
        h = torch.zeros(0, 3, 4, 8, requires_grad=True)
        w = torch.randn(11, 8, requires_grad=True)
        lp = rk.linear_logprob(h, w, torch.zeros(0, 1, 4, dtype=torch.long), impl={impl!r})
        assert lp.shape == (0, 3, 4), lp.shape
        loss = rk.rag_loss(h, w, torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 3),
                           impl={impl!r}, reduction="sum")
        loss.backward()
        assert float(loss) == 0.0 and h.grad.shape == h.shape
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, (r.returncode, r.stderr[-2000:])


@pytest.mark.parametrize("impl", LLP)
def test_one_query_one_token_backward(impl):
    """One query with a one-token answer: the kept-row mask of a [1, 1] target was a stride-0
    view updated in place ("more than one element ... refers to a single memory location")."""
    dt = torch.float32 if impl == "triton" else torch.float64  # Triton takes no float64
    g = torch.Generator().manual_seed(0)
    h64 = torch.randn(1, 4, 1, 2, generator=g, dtype=torch.float64)
    w64 = torch.randn(3, 2, generator=g, dtype=torch.float64)
    s64 = torch.randn(1, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([[2]])
    h, w, s = (x.to(dt).requires_grad_() for x in (h64, w64, s64))
    got = _grads(rk.rag_loss(h, w, y, s, impl=impl), h, w, s)
    h64, w64, s64 = (x.requires_grad_() for x in (h64, w64, s64))
    want = _grads(rk.rag_loss(h64, w64, y, s64, impl="reference"), h64, w64, s64)
    tol = 1e-9 if dt == torch.float64 else 1e-5
    for a, e, n in zip(got, want, ("hidden", "weight", "doc_scores"), strict=True):
        assert_close(a, e, rtol=tol, atol=tol * 1e-3, name=n)
    lp = rk.linear_logprob(h, w, y[:, None, :], impl=impl)
    lp.sum().backward()
    assert torch.isfinite(h.grad).all()
    for get_nll in (rk.hf.rag_sequence_get_nll, rk.hf.rag_token_get_nll):
        hh = h.detach().reshape(4, 1, 2).requires_grad_()
        get_nll(hh, w.detach(), s.detach(), y, pad_token_id=0, impl=impl).sum().backward()
        assert (hh.grad == 0).all()  # T = 1: the shifted target is padding only


# ------------------------------------------------------------------------------ NaN policy


@pytest.mark.parametrize("impl", TS)
@pytest.mark.parametrize("mode", ["sequence", "token"])
@pytest.mark.parametrize("eps", [0.0, 0.1], ids=["eps0", "eps0.1"])
def test_nan_at_ignored_rows_and_masked_docs_reaches_no_gradient(impl, mode, eps):
    """Whatever ignored target positions and masked documents hold (NaN here) reaches
    neither the loss nor any gradient, in every mode and implementation."""
    g = torch.Generator().manual_seed(1)
    B, K, T, H, V = 2, 3, 5, 8, 13
    h = torch.randn(B, K, T, H, generator=g)
    w = torch.randn(V, H, generator=g) / H**0.5
    s = torch.randn(B, K, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    y[:, 1] = -100
    dm = torch.ones(B, K, dtype=torch.bool)
    dm[0, 2] = False
    poisoned = h.clone()
    poisoned[:, :, 1] = NAN  # ignored position
    poisoned[0, 2] = NAN  # masked document
    results = []
    for hh in (h, poisoned):
        hh = hh.clone().requires_grad_()
        ww, ss = w.clone().requires_grad_(), s.clone().requires_grad_()
        loss = rk.rag_loss(hh, ww, y, ss, mode=mode, label_smoothing=eps, doc_mask=dm, impl=impl)
        results.append((loss, *_grads(loss, hh, ww, ss)))
    clean, dirty = results
    keep = torch.ones(B, K, T, 1, dtype=torch.bool)
    keep[:, :, 1] = False
    keep[0, 2] = False
    assert torch.isfinite(dirty[0]), dirty[0]
    assert_close(dirty[0], clean[0], rtol=1e-6, name="loss")
    assert torch.isfinite(dirty[1]).all(), "NaN reached the hidden gradient"
    assert_close(dirty[1] * keep, clean[1] * keep, rtol=1e-5, atol=1e-7, name="hidden grad")
    assert (dirty[1][~keep.expand_as(dirty[1])] == 0).all(), "masked rows got a gradient"
    assert_close(dirty[2], clean[2], rtol=1e-5, atol=1e-7, name="weight grad")
    assert_close(dirty[3], clean[3], rtol=1e-5, atol=1e-7, name="doc_scores grad")


@pytest.mark.parametrize("impl", LLP)
def test_nan_in_weight_propagates(impl):
    """A NaN in the LM-head weight makes every row's statistics NaN (cpu gave lp=+inf,
    lse=-inf: a NaN partial sum was dropped in the merge)."""
    w = torch.randn(5, 4)
    w[2, 1] = NAN
    out = rk.linear_logprob(
        torch.randn(3, 4), w, torch.tensor([1, 2, 3]), impl=impl, return_stats=True
    )
    for name, x in zip(("logprob", "lse", "sum_logprob"), out, strict=True):
        assert torch.isnan(x).all(), (name, x)


def _masked_vocab(V, masked, shape, g):
    """A bias of 0 with -inf on ``masked``, and targets of ``shape`` outside the mask."""
    b = torch.zeros(V)
    b[masked] = float("-inf")
    ids = (b == 0).nonzero().squeeze(1)
    return b, ids[torch.randint(0, ids.numel(), shape, generator=g)]


def _rag_masked_vocab(masked, seed):
    """RAG inputs (B=2, K=3, T=4, H=8, V=300) with a -inf bias on ``masked``."""
    g = torch.Generator().manual_seed(seed)
    B, K, T, H, V = 2, 3, 4, 8, 300
    h = torch.randn(B, K, T, H, generator=g)
    w = torch.randn(V, H, generator=g)
    s = torch.randn(B, K, generator=g)
    return (h, w, s, *_masked_vocab(V, masked, (B, T), g))


# Whole vocabulary tiles / splits under a -inf bias: the first tiles (the online max stays
# -inf), a middle run, and all but the last column.
MASKED = [
    pytest.param(slice(0, 260), id="leading"),
    pytest.param(slice(64, 230), id="middle"),
    pytest.param(slice(0, 299), id="all-but-one"),
]


@pytest.mark.parametrize("impl", LLP)
@pytest.mark.parametrize("masked", MASKED)
def test_minus_inf_bias_over_whole_vocabulary_tiles(impl, masked, monkeypatch):
    """A -inf bias masks vocabulary entries (their probability is 0). Where it covers a whole
    vocabulary tile before any finite logit (cpu) or a whole vocabulary split (triton), the
    online log-sum-exp shifted by a -inf running max: exp(-inf - -inf) = NaN in every output
    and gradient. The masked entries must simply not count, as in the reference."""
    from rag_kernels.ops.linear_logprob import cpu as llp_cpu

    monkeypatch.setattr(llp_cpu, "TILE_ROWS", 4)
    monkeypatch.setattr(llp_cpu, "TILE_VOCAB", 64)  # V = 300: five tiles, two workers
    g = torch.Generator().manual_seed(3)
    N, H, V = 6, 8, 300
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g)
    b, y = _masked_vocab(V, masked, (N,), g)
    results = []
    for which in (impl, "reference"):
        hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
        lp, lse, _ = rk.linear_logprob(hh, ww, y, bias=bb, impl=which, return_stats=True)
        results.append((lp, lse, *_grads(lp.sum() + 0.5 * lse.sum(), hh, ww, bb)))
    for name, a, e in zip(("logprob", "lse", "hidden grad", "weight grad", "bias grad"),
                          *results, strict=True):  # fmt: skip
        assert torch.isfinite(a).all(), f"{name}: {a}"
        assert_close(a, e, rtol=1e-5, atol=1e-5, name=name)
    # a NaN logit under the mask (NaN weight row) still makes every row NaN
    w[masked.start] = NAN
    for name, x in zip(("logprob", "lse", "sum_logprob"),
                       rk.linear_logprob(h, w, y, bias=b, impl=impl, return_stats=True),
                       strict=True):  # fmt: skip
        assert torch.isnan(x).all(), (name, x)


@pytest.mark.parametrize("impl", TS)
@pytest.mark.parametrize("mode", ["sequence", "token"])
@pytest.mark.parametrize("masked", MASKED)
def test_rag_loss_minus_inf_bias_over_whole_vocabulary_tiles(impl, mode, masked, monkeypatch):
    """The same vocabulary mask through rag_loss (the token-smoothing kernels)."""
    from rag_kernels.ops.token_smoothing import cpu as ts_cpu

    monkeypatch.setattr(ts_cpu, "TILES", (4, 64, 4, 64))
    h, w, s, b, y = _rag_masked_vocab(masked, seed=4)
    results = []
    for which in (impl, "reference"):
        hh, ww, ss, bb = (x.clone().requires_grad_() for x in (h, w, s, b))
        loss = rk.rag_loss(hh, ww, y, ss, mode=mode, bias=bb, impl=which)
        results.append((loss, *_grads(loss, hh, ww, ss, bb)))
    names = ("loss", "hidden grad", "weight grad", "doc_scores grad", "bias grad")
    for name, a, e in zip(names, *results, strict=True):
        assert torch.isfinite(a).all(), f"{name}: {a}"
        assert_close(a, e, rtol=1e-5, atol=1e-5, name=name)


@pytest.mark.parametrize("impl", TS)
@pytest.mark.parametrize("tiles", [(0, 0, 0, 0), (4, 64, 4, 64)], ids=["default", "tiles64"])
@pytest.mark.parametrize("masked", MASKED)
def test_token_smoothing_minus_inf_bias(impl, tiles, masked, monkeypatch):
    """A -inf bias under the RAG-Token smoothing statistic (label smoothing > 0). A masked
    column has p_marg = 0 in every document, so the statistic is -inf, as in the reference
    (cpu gave NaN: the mixture over documents shifted by a max that is -inf, as did the
    multi-tile log-sum-exp); each document's target log-prob and its gradient stay finite
    (cpu gave NaN dh even with no gradient on the statistic). The kernels give a masked column
    no posterior weight, so the statistic's gradient is that of the sum over the unmasked
    columns (the reference on the unmasked vocabulary; plain PyTorch's logsumexp of -infs has a
    NaN gradient)."""
    from rag_kernels.ops.token_smoothing import cpu as ts_cpu
    from rag_kernels.ops.token_smoothing import token_smoothing_with_logprob

    monkeypatch.setattr(ts_cpu, "TILES", tiles)
    h, w, s, b, y = _rag_masked_vocab(masked, seed=5)
    g = torch.Generator().manual_seed(6)
    keep = b == 0
    out_ref, lp_ref = token_smoothing_with_logprob(h, w, s, y, bias=b, impl="reference")
    assert (out_ref == float("-inf")).all()
    leaves = [x.clone().requires_grad_() for x in (h, w, s, b)]
    out, lp = token_smoothing_with_logprob(*leaves[:3], y, bias=leaves[3], impl=impl)
    assert (out == float("-inf")).all(), out
    assert_close(lp, lp_ref, rtol=1e-5, atol=1e-5, name="lp")
    names = ("hidden grad", "weight grad", "doc_scores grad", "bias grad")
    gw_lp = torch.randn(lp.shape, generator=g)
    ref_leaves = [x.clone().requires_grad_() for x in (h, w, s, b)]
    _, lp_r = token_smoothing_with_logprob(*ref_leaves[:3], y, bias=ref_leaves[3], impl="reference")
    for i in (0, 1, 3):  # lp does not depend on doc_scores
        (a,) = torch.autograd.grad((gw_lp * lp).sum(), leaves[i], retain_graph=True)
        (e,) = torch.autograd.grad((gw_lp * lp_r).sum(), ref_leaves[i], retain_graph=True)
        assert torch.isfinite(a).all(), f"lp only, {names[i]}"
        assert_close(a, e, rtol=1e-5, atol=1e-5, name=f"lp only, {names[i]}")
    # through rag_loss: the smoothed RAG-Token loss is +inf, as the reference's
    loss = rk.rag_loss(h, w, y, s, mode="token", bias=b, label_smoothing=0.1, impl=impl)
    assert loss == float("inf"), loss
    if impl == "reference":
        return
    # the kernels' gradient of the statistic: that of the unmasked vocabulary, and nothing on
    # the masked rows
    leaves = [x.clone().requires_grad_() for x in (h, w, s, b)]
    out = rk.token_smoothing(*leaves[:3], bias=leaves[3], impl=impl)
    gw_out = torch.rand(out.shape, generator=g)
    got = torch.autograd.grad(out, leaves, gw_out)
    sub = [x.clone().requires_grad_() for x in (h, w[keep], s, b[keep])]
    want = torch.autograd.grad(
        rk.token_smoothing(*sub[:3], bias=sub[3], impl="reference"), sub, gw_out
    )
    for name, a, e in zip(names, (got[0], got[1][keep], got[2], got[3][keep]), want, strict=True):
        assert_close(a, e, rtol=1e-5, atol=1e-5, name=f"statistic, {name}")
    # (up to the cpu exp's clamp at exp(-87): terms of 1e-38)
    for a in (got[1][~keep], got[3][~keep]):
        assert a.abs().max() < 1e-30, f"masked rows got a gradient: {a.abs().max()}"


@pytest.mark.parametrize("impl", MARG)
@pytest.mark.parametrize("token_mode", [False, True], ids=["sequence", "token"])
def test_zero_likelihood_on_every_document_gives_inf_loss(impl, token_mode):
    """A token whose log-prob is -inf on every document: the likelihood is 0, the loss +inf
    (cpu/triton gave NaN from shifting a log-sum-exp by -inf)."""
    lp = torch.randn(2, 3, 4, dtype=torch.float64)
    lp[0, :, 1] = float("-inf")
    s = torch.randn(2, 3, dtype=torch.float64)
    fn = rk.rag_token_loss if token_mode else rk.rag_sequence_loss
    got = fn(lp, s, reduction="none", impl=impl)
    want = fn(lp, s, reduction="none", impl="reference")
    assert got[0] == float("inf"), got
    assert_close(got[1:], want[1:], rtol=1e-12, name="other queries")


def test_hf_sequence_checks_doc_scores():
    """rag_sequence_get_nll skipped the doc-score value check (a NaN score gave NaN silently)."""
    h = torch.randn(4, 3, 8)
    for bad in (NAN, float("inf")):
        s = torch.randn(2, 2)
        s[1, 0] = bad
        with pytest.raises(ValueError, match="doc_scores"):
            rk.hf.rag_sequence_get_nll(
                h, torch.randn(7, 8), s, torch.randint(1, 7, (2, 3)), pad_token_id=0
            )


# --------------------------------------------------------------- empty dims and bad options


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(
            lambda: rk.rag_sequence_loss(torch.randn(2, 0, 3), torch.randn(2, 0)),
            id="rag_sequence_loss",
        ),
        pytest.param(
            lambda: rk.rag_token_loss(torch.randn(2, 0, 3), torch.randn(2, 0)), id="rag_token_loss"
        ),
        pytest.param(
            lambda: rk.rag_loss(
                torch.randn(2, 0, 3, 4),
                torch.randn(5, 4),
                torch.randint(0, 5, (2, 3)),
                torch.randn(2, 0),
            ),
            id="rag_loss",
        ),
        pytest.param(
            lambda: rk.rag_loss(
                torch.randn(2, 0, 3, 4),
                torch.randn(5, 4),
                torch.randint(0, 5, (2, 3)),
                torch.randn(2, 0),
                mode="token",
                label_smoothing=0.1,
            ),
            id="rag_loss-token-smoothed",
        ),
    ],
)
def test_no_documents_is_an_error(call):
    """K = 0 returned +inf with no error (the value check returns early on empty tensors)."""
    with pytest.raises(ValueError, match="at least one document"):
        call()


@pytest.mark.parametrize(
    ("softcap", "exc"),
    [
        pytest.param(float("inf"), ValueError, id="inf"),
        pytest.param(float("nan"), ValueError, id="nan"),
        pytest.param(True, ValueError, id="bool"),
        pytest.param(0.0, ValueError, id="zero"),
        pytest.param(-3.0, ValueError, id="negative"),
    ],
)
def test_bad_softcap(softcap, exc):
    h, w, y = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([1, 2, 3])
    with pytest.raises(exc, match="softcap"):
        rk.linear_logprob(h, w, y, softcap=softcap)
    with pytest.raises(exc, match="softcap"):
        rk.rag_loss(h[None, None], w, y[None], torch.zeros(1, 1), softcap=softcap)


def test_zero_hidden_size_and_empty_vocabulary_are_errors():
    with pytest.raises(ValueError, match="hidden size"):
        rk.linear_logprob(torch.randn(3, 0), torch.randn(5, 0), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="vocabulary row"):
        rk.linear_logprob(torch.randn(3, 4), torch.randn(0, 4), torch.full((3,), -100))


@pytest.mark.parametrize("impl", TS)
@pytest.mark.parametrize("shape", [(0, 2, 3), (2, 2, 0)], ids=["B=0", "T=0"])
@pytest.mark.parametrize("mode", ["sequence", "token"])
@pytest.mark.parametrize("eps", [0.0, 0.1], ids=["eps0", "eps0.1"])
def test_empty_batch_or_answer(impl, shape, mode, eps):
    """T = 0 / B = 0 failed deep inside torch in the token-smoothing paths; now the loss of
    an empty batch sums to 0 and backward gives zero gradients of the right shapes."""
    B, K, T = shape
    h = torch.randn(B, K, T, 4, requires_grad=True)
    w = torch.randn(5, 4, requires_grad=True)
    s = torch.randn(B, K, requires_grad=True)
    loss = rk.rag_loss(
        h,
        w,
        torch.randint(0, 5, (B, T)),
        s,
        mode=mode,
        label_smoothing=eps,
        impl=impl,
        reduction="sum",
    )
    loss.backward()
    assert abs(float(loss.detach())) < 1e-6, loss
    assert h.grad is not None and h.grad.shape == h.shape and (h.grad == 0).all()


def test_mean_over_an_empty_batch_is_nan():
    """Documented: reduction="mean" over zero queries is NaN (torch's convention)."""
    out = rk.rag_sequence_loss(torch.randn(0, 2, 3), torch.randn(0, 2))
    assert torch.isnan(out)


@pytest.mark.parametrize(
    "dtype, ignore_index",
    [
        pytest.param(torch.int32, 2**32, id="int32-2^32"),
        pytest.param(torch.int32, -(2**31) - 1, id="int32-below"),
        pytest.param(torch.int64, 2**63, id="int64-2^63"),
    ],
)
@pytest.mark.parametrize("op", ["linear_logprob", "token_smoothing", "rag_loss"])
def test_ignore_index_outside_the_target_dtype_is_an_error(op, dtype, ignore_index):
    """int32 targets compared with ignore_index=2**32 wrapped it to 0: every row whose target
    is 0 was silently ignored by the reference and triton (cpu compared in int64)."""
    from rag_kernels.ops.token_smoothing import token_smoothing_with_logprob

    h, w, s = torch.randn(2, 3, 4, 8), torch.randn(7, 8), torch.randn(2, 3)
    y = torch.randint(0, 7, (2, 4), dtype=dtype)
    call = {
        "linear_logprob": lambda: rk.linear_logprob(h, w, y[:, None], ignore_index=ignore_index),
        "token_smoothing": lambda: token_smoothing_with_logprob(
            h, w, s, y, ignore_index=ignore_index
        ),
        "rag_loss": lambda: rk.rag_loss(h, w, y, s, ignore_index=ignore_index),
    }[op]
    with pytest.raises(ValueError, match=r"^ignore_index must fit target's dtype"):
        call()


# ------------------------------------------------------------------- higher-order gradients


def _second_order_cases():
    """(op, impl, inputs factory, forward) per fused op: forward(*inputs) -> scalar loss."""
    g = torch.Generator().manual_seed(8)
    y = torch.randint(0, 7, (2, 4), generator=g)

    def make(*shapes):
        return lambda dt: [torch.randn(s, generator=g, dtype=dt).requires_grad_() for s in shapes]

    from rag_kernels.ops.token_smoothing import token_smoothing_with_logprob

    ops = {
        "linear_logprob": (
            make((2, 3, 4, 5), (7, 5)),
            lambda impl, h, w: rk.linear_logprob(h, w, y[:, None], impl=impl).sum(),
        ),
        "marginalize": (
            make((2, 3, 4), (2, 3)),
            lambda impl, lp, s: rk.rag_token_loss(lp - 3, s, impl=impl),
        ),
        "token_smoothing": (
            make((2, 3, 4, 5), (7, 5), (2, 3)),
            lambda impl, h, w, s: sum(
                x.sum() for x in token_smoothing_with_logprob(h, w, s, y, impl=impl)
            ),
        ),
        "contrastive": (
            make((3, 5), (4, 5)),
            lambda impl, q, d: rk.contrastive_loss(q, d, impl=impl),
        ),
    }
    return [
        pytest.param(op, *ops[op], p.values[0], marks=p.marks, id=f"{op}-{p.id}")
        for op in ops
        for p in impl_params(op, ("cpu", "triton"))
    ]


@pytest.mark.parametrize("op, inputs, forward, impl", _second_order_cases())
def test_higher_order_gradients_raise_instead_of_going_missing(op, inputs, forward, impl):
    """The fused kernels' gradients are computed, not traced: a gradient of them (a gradient
    penalty through create_graph=True) silently lacked their part (marginalize), or the cpu
    kernels failed inside the backward ("functions with out=... arguments"). First-order
    gradients under create_graph=True are the plain ones; a higher-order one raises."""
    dt = torch.float32 if impl == "triton" else torch.float64
    xs = inputs(dt)
    plain = torch.autograd.grad(forward(impl, *xs), xs)
    under = torch.autograd.grad(forward(impl, *xs), xs, create_graph=True)
    for a, e in zip(under, plain, strict=True):
        assert torch.equal(a.detach(), e)
    penalty = sum(x.pow(2).sum() for x in under) + xs[-1].sum()
    with pytest.raises(RuntimeError, match=rf"^{op}: the fused kernels' gradients are not"):
        torch.autograd.grad(penalty, xs[-1])
    # the reference differentiates twice
    ref = torch.autograd.grad(forward("reference", *xs), xs, create_graph=True)
    torch.autograd.grad(sum(x.pow(2).sum() for x in ref), xs[-1])
