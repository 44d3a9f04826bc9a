"""Parity of rag_kernels.integrations.hf drop-ins with transformers' own RAG ``get_nll``.

transformers' ``RagSequenceForGeneration.get_nll`` / ``RagTokenForGeneration.get_nll`` are
called unbound with a stand-in ``self`` (only ``config`` and, for the token model,
``marginalize`` are used) on the materialised logits ``hidden @ weight.T (+ bias)``.
float64: loss values and gradients (hidden, weight, bias, doc_scores) agree to 1e-9 relative.
float32: our error against the float64 truth is at most 2x transformers' own float32 error
plus 1e-6. impl: "reference" and "cpu" in float64 and float32, "triton" (interpreter on CPU,
fp32-only kernel) in float32; an impl whose kernel is absent or rejects the dtype is skipped.
"""

from __future__ import annotations

import os
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import rag_kernels.integrations.hf as rkhf  # noqa: E402
from toolkit import assert_close, impl_params  # noqa: E402

modeling_rag = pytest.importorskip("transformers.models.rag.modeling_rag")
HFSeq = modeling_rag.RagSequenceForGeneration
HFTok = modeling_rag.RagTokenForGeneration

PAD, BOS = 1, 0

# (B, K, T, H, V, bias, softcap)
SHAPES = [
    (2, 3, 7, 5, 13, False, None),
    (3, 4, 9, 6, 31, True, None),
    (2, 1, 5, 4, 11, False, None),
    (2, 2, 2, 3, 7, True, None),
    (2, 2, 1, 3, 7, False, None),
    (2, 3, 6, 4, 17, True, 2.5),
]


def _shape_id(s):
    B, K, T, H, V, bias, cap = s
    return f"B{B}K{K}T{T}H{H}V{V}" + ("-bias" if bias else "") + (f"-cap{cap}" if cap else "")


SHAPE_IDS = [_shape_id(s) for s in SHAPES]

# pads: where the original target holds pad tokens (the shift always pads the last slot too)
PADS = ["last-only", "pads-at-end", "pad-at-shifted-1"]
# bos: (exclude_bos_score, bos_token_id, whether every first shifted token is BOS)
BOS_MODES = {
    "no-exclude": (False, BOS, True),
    "exclude-all-bos": (True, BOS, True),
    "exclude-some-bos": (True, BOS, False),
    "exclude-bos-none": (True, None, True),
}
# The Triton log-prob kernel takes fp32/bf16/fp16 only: it joins the float32 checks.
IMPLS_F64 = impl_params("linear_logprob", ("reference", "cpu"))


pytestmark = pytest.mark.usefixtures("one_thread")


def _make_case(shape, pads: str, all_bos: bool, dtype=torch.float64, seed=0):
    B, K, T, H, V, has_bias, cap = shape
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B * K, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5 * 2
    bias = torch.randn(V, generator=g, dtype=torch.float64) if has_bias else None
    scores = torch.randn(B, K, generator=g, dtype=torch.float64) * 2
    target = torch.randint(2, V, (B, T), generator=g)
    if T >= 2:
        target[:, 1] = BOS if all_bos else target[:, 1]
        if not all_bos:
            target[0, 1] = BOS  # one row starts with BOS, another must not
            target[-1, 1] = 2
    if pads == "pads-at-end" and T >= 4:
        target[0, T - 2 :] = PAD
        target[-1, T - 1 :] = PAD
    if pads == "pad-at-shifted-1" and T >= 3:
        target[0, 2:] = PAD  # query 0: shifted position 1 (where the prior rides) is padding
        target[-1, 2] = PAD  # last query: a pad in the middle, real tokens after it
    cast = lambda x: None if x is None else x.to(dtype).requires_grad_(True)
    return dict(
        hidden=cast(hidden),
        weight=cast(weight),
        bias=cast(bias),
        scores=cast(scores),
        target=target,
        cap=cap,
        K=K,
    )


def _hf_self(K: int, bos_token_id, token: bool):
    gen = types.SimpleNamespace(pad_token_id=PAD, bos_token_id=bos_token_id)
    me = types.SimpleNamespace(
        config=types.SimpleNamespace(n_docs=K, bos_token_id=None, generator=gen)
    )
    if token:
        me.marginalize = types.MethodType(HFTok.marginalize, me)
    return me


def _logits(c):
    z = c["hidden"] @ c["weight"].T
    if c["bias"] is not None:
        z = z + c["bias"]
    if c["cap"] is not None:
        z = c["cap"] * torch.tanh(z / c["cap"])
    return z


def _hf_loss(c, token: bool, bos_token_id, **kw):
    me = _hf_self(c["K"], bos_token_id, token)
    cls = HFTok if token else HFSeq
    return cls.get_nll(me, _logits(c), c["scores"], c["target"], **kw)


def _rk_loss(c, token: bool, bos_token_id, impl, **kw):
    fn = rkhf.rag_token_get_nll if token else rkhf.rag_sequence_get_nll
    if not token:
        kw["bos_token_id"] = bos_token_id
    return fn(
        c["hidden"],
        c["weight"],
        c["scores"],
        c["target"],
        pad_token_id=PAD,
        bias=c["bias"],
        softcap=c["cap"],
        impl=impl,
        **kw,
    )


def _leaves(c):
    return [x for x in (c["hidden"], c["weight"], c["bias"], c["scores"]) if x is not None]


def _loss_and_grads(loss, c, upstream):
    grads = torch.autograd.grad(
        loss, _leaves(c), upstream, allow_unused=True, materialize_grads=True
    )
    return loss.detach(), grads


def _upstream(loss: torch.Tensor, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5).to(loss.dtype)


def _check_parity(ours, theirs, c, tol=1e-9):
    g = _upstream(theirs)
    lo, go = _loss_and_grads(ours, c, g.to(ours.dtype))
    lt, gt = _loss_and_grads(theirs, c, g)
    assert lo.shape == lt.shape
    # max|a - b| <= tol * max(max|b|, 1e-6)
    assert_close(lo, lt, rtol=tol, atol=tol * 1e-6, name="loss")
    names = (
        ["hidden", "weight", "bias", "doc_scores"]
        if c["bias"] is not None
        else ["hidden", "weight", "doc_scores"]
    )
    for name, a, b in zip(names, go, gt, strict=True):
        assert torch.isfinite(a).all(), name
        assert_close(a, b, rtol=tol, atol=tol * 1e-6, name=name)


def _seq_params():
    out = []
    for shape in SHAPES:
        T = shape[2]
        for eps in (0.0, 0.1):
            for pads in PADS if T >= 4 else PADS[:1]:
                for bos_mode in BOS_MODES if T >= 2 else ["no-exclude", "exclude-all-bos"]:
                    out.append(
                        pytest.param(
                            shape,
                            eps,
                            pads,
                            bos_mode,
                            id=f"{_shape_id(shape)}-eps{eps:g}-{pads}-{bos_mode}",
                        )
                    )
    return out


def _tok_params():
    return [
        pytest.param(shape, eps, pads, id=f"{_shape_id(shape)}-eps{eps:g}-{pads}")
        for shape in SHAPES
        for eps in (0.0, 0.1)
        for pads in (PADS if shape[2] >= 4 else PADS[:1])
    ]


@pytest.mark.parametrize("impl", IMPLS_F64)
@pytest.mark.parametrize("shape,epsilon,pads,bos_mode", _seq_params())
def test_rag_sequence_float64_parity(shape, epsilon, pads, bos_mode, impl):
    exclude, bos_id, all_bos = BOS_MODES[bos_mode]
    c = _make_case(shape, pads, all_bos)
    for reduce_loss in (False, True):
        kw = dict(reduce_loss=reduce_loss, epsilon=epsilon, exclude_bos_score=exclude)
        theirs = _hf_loss(c, False, bos_id, **kw)
        ours = _rk_loss(c, False, bos_id, impl, **kw)
        assert ours.dtype == torch.float64
        _check_parity(ours, theirs, c)


@pytest.mark.parametrize("impl", IMPLS_F64)
@pytest.mark.parametrize("shape,epsilon,pads", _tok_params())
def test_rag_token_float64_parity(shape, epsilon, pads, impl):
    c = _make_case(shape, pads, True)
    for reduce_loss in (False, True):
        kw = dict(reduce_loss=reduce_loss, epsilon=epsilon)
        theirs = _hf_loss(c, True, BOS, **kw)
        ours = _rk_loss(c, True, BOS, impl, **kw)
        assert ours.dtype == torch.float64
        _check_parity(ours, theirs, c)


def test_exclude_bos_branch_is_data_dependent():
    """The same call excludes position 0 or not depending on the data (no Python branch)."""
    shape = SHAPES[0]
    c_all = _make_case(shape, "last-only", True)
    c_some = _make_case(shape, "last-only", False)
    for c in (c_all, c_some):
        on = _rk_loss(c, False, BOS, "reference", exclude_bos_score=True)
        off = _rk_loss(c, False, BOS, "reference", exclude_bos_score=False)
        if c is c_all:
            assert (on < off).all()  # a log-prob term (< 0) was dropped from the nll
        else:
            torch.testing.assert_close(on, off, rtol=1e-14, atol=0)


F32_SHAPES = [SHAPES[1], (2, 3, 11, 24, 301, True, None)]
# The Triton kernels run in the (slow) interpreter on CPU: the small shape only.
F32_PARAMS = [
    pytest.param(shape, *p.values, id=f"{_shape_id(shape)}-{p.id}", marks=p.marks)
    for shape in F32_SHAPES
    for p in impl_params("linear_logprob")
    if p.values[0] != "triton" or shape is F32_SHAPES[0]
]


@pytest.mark.parametrize("token", [False, True], ids=["sequence", "token"])
@pytest.mark.parametrize("epsilon", [0.0, 0.1], ids=["eps0", "eps0.1"])
@pytest.mark.parametrize("shape,impl", F32_PARAMS)
def test_float32_error_within_2x_transformers(shape, epsilon, token, impl):
    """fp32 drop-in error vs the fp64 truth <= 2x transformers' own fp32 error + 1e-6."""
    c64 = _make_case(shape, "pads-at-end", True, torch.float64)
    c32 = _make_case(shape, "pads-at-end", True, torch.float32)
    kw = dict(epsilon=epsilon)
    if not token:
        kw["exclude_bos_score"] = True
    truth = _hf_loss(c64, token, BOS, **kw)
    g = _upstream(truth)
    lt, gt = _loss_and_grads(truth, c64, g)
    lh, gh = _loss_and_grads(_hf_loss(c32, token, BOS, **kw), c32, g.float())
    ours = _rk_loss(c32, token, BOS, impl, **kw)
    assert ours.dtype == torch.float32
    lo, go = _loss_and_grads(ours, c32, g.float())
    # relative to max(max|truth|, 1e-6): err <= 2 err_transformers + 1e-6 scale
    assert_close(lo, lt, ref=lh, rtol=1e-6, atol=1e-12, name="loss")
    names = (
        ["hidden", "weight", "bias", "doc_scores"]
        if c32["bias"] is not None
        else ["hidden", "weight", "doc_scores"]
    )
    for name, a, b, t in zip(names, go, gh, gt, strict=True):
        assert_close(a, t, ref=b, rtol=1e-6, atol=1e-12, name=name)


@pytest.mark.parametrize("impl", IMPLS_F64)
@pytest.mark.parametrize("token", [False, True], ids=["sequence", "token"])
def test_nan_in_padded_rows_does_not_leak(token, impl):
    """Hidden states at positions whose shifted target is padding are never read."""
    c = _make_case(SHAPES[1], "pad-at-shifted-1", True)
    kw = dict(epsilon=0.1)
    if not token:
        kw.update(exclude_bos_score=True, bos_token_id=BOS)
    fn = rkhf.rag_token_get_nll if token else rkhf.rag_sequence_get_nll
    B, K = c["scores"].shape
    shifted = torch.cat([c["target"][:, 1:], torch.full((B, 1), PAD)], 1)
    pad_rows = (shifted == PAD).repeat_interleave(K, 0)  # [B*K, T]
    poisoned = c["hidden"].detach().clone()
    poisoned[pad_rows] = float("nan")
    poisoned.requires_grad_(True)
    args = (c["weight"], c["scores"], c["target"])
    clean = fn(c["hidden"], *args, pad_token_id=PAD, bias=c["bias"], impl=impl, **kw)
    dirty = fn(poisoned, *args, pad_token_id=PAD, bias=c["bias"], impl=impl, **kw)
    torch.testing.assert_close(dirty, clean, rtol=1e-12, atol=0)
    g = _upstream(clean)
    gc = torch.autograd.grad(clean, [c["hidden"], c["weight"], c["scores"]], g)
    gd = torch.autograd.grad(dirty, [poisoned, c["weight"], c["scores"]], g)
    assert (gd[0][pad_rows] == 0).all()
    for a, b in zip(gd, gc, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_n_docs_explicit_matches_default():
    c = _make_case(SHAPES[0], "pads-at-end", True)
    a = _rk_loss(c, False, BOS, "reference", n_docs=c["K"])
    b = _rk_loss(c, False, BOS, "reference")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS_F64)
@pytest.mark.parametrize("first", [13, -5], ids=["first-id-too-large", "first-id-negative"])
@pytest.mark.parametrize("token", [False, True], ids=["sequence", "token"])
def test_unread_first_target_column_is_not_checked(token, first, impl):
    """transformers predicts target[:, 1:] and never reads target[:, 0] (often a decoder start
    id): any value there is accepted and changes nothing, as in transformers."""
    c = _make_case(SHAPES[0], "pads-at-end", True)  # V = 13
    c["target"][:, 0] = first
    for eps in (0.0, 0.1):
        ours = _rk_loss(c, token, BOS, impl, epsilon=eps)
        _check_parity(ours, _hf_loss(c, token, BOS, epsilon=eps), c)


@pytest.mark.parametrize("impl", IMPLS_F64)
@pytest.mark.parametrize("token", [False, True], ids=["sequence", "token"])
def test_one_position_gives_zero_doc_scores_gradient(token, impl):
    """T = 1: every shifted position is padding, and doc_scores gets a zero gradient (not
    None), as in transformers, so an optimiser step over it behaves the same."""
    c = _make_case(SHAPES[4], "last-only", True)  # T = 1
    for loss in (_rk_loss(c, token, BOS, impl), _hf_loss(c, token, BOS)):
        c["scores"].grad = None
        loss.sum().backward()
        assert c["scores"].grad is not None
        assert (c["scores"].grad == 0).all()


def _bad_inputs():
    h = torch.randn(6, 5, 4)
    w = torch.randn(13, 4)
    s = torch.randn(2, 3)
    t = torch.randint(2, 13, (2, 5))
    ok = dict(hidden=h, weight=w, doc_scores=s, target=t, pad_token_id=PAD)
    cases = {
        "hidden-2d": (dict(ok, hidden=h[0]), ValueError, "hidden"),
        "weight-H-mismatch": (dict(ok, weight=torch.randn(13, 3)), ValueError, "weight"),
        "n_docs-not-divisor": (dict(ok, n_docs=4), ValueError, "n_docs"),
        "n_docs-vs-doc_scores": (dict(ok, n_docs=2), ValueError, "doc_scores"),
        "doc_scores-shape": (dict(ok, doc_scores=torch.randn(1, 3)), ValueError, "doc_scores"),
        "target-shape": (dict(ok, target=t[:, :4]), ValueError, "target"),
        "target-float": (dict(ok, target=t.float()), TypeError, "target"),
        "target-out-of-range": (dict(ok, target=t.clone().fill_(13)), ValueError, "target"),
        "target-negative": (dict(ok, target=t.clone().fill_(-5)), ValueError, "target"),
        "pad-not-int": (dict(ok, pad_token_id=1.0), TypeError, "pad_token_id"),
        "pad-bool": (dict(ok, pad_token_id=True), TypeError, "pad_token_id"),
        "pad-beyond-int32-target": (
            dict(ok, target=t.int(), pad_token_id=2**31),
            ValueError,
            "^pad_token_id must fit target's dtype",
        ),
        "epsilon-out-of-range": (dict(ok, epsilon=1.5), ValueError, "epsilon"),
        "weight-dtype": (dict(ok, weight=w.double()), TypeError, "weight"),
        "bias-shape": (dict(ok, bias=torch.randn(12)), ValueError, "bias"),
        "reduce_loss-not-bool": (dict(ok, reduce_loss=1), TypeError, "reduce_loss"),
        "impl-unknown": (dict(ok, impl="cuda"), ValueError, "impl"),
        "empty-T": (dict(ok, hidden=h[:, :0], target=t[:, :0]), ValueError, "hidden"),
    }
    return cases


@pytest.mark.parametrize("token", [False, True], ids=["sequence", "token"])
@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_validation_names_the_argument(case, token):
    kwargs, exc, name = _bad_inputs()[case]
    fn = rkhf.rag_token_get_nll if token else rkhf.rag_sequence_get_nll
    with pytest.raises(exc, match=name):
        fn(**kwargs)


def test_sequence_only_arguments_are_validated():
    h, w, s, t = (
        torch.randn(6, 5, 4),
        torch.randn(13, 4),
        torch.randn(2, 3),
        torch.randint(2, 13, (2, 5)),
    )
    with pytest.raises(TypeError, match="bos_token_id"):
        rkhf.rag_sequence_get_nll(h, w, s, t, pad_token_id=PAD, bos_token_id="0")
    with pytest.raises(TypeError, match="exclude_bos_score"):
        rkhf.rag_sequence_get_nll(h, w, s, t, pad_token_id=PAD, exclude_bos_score=None)


def test_exclude_bos_compiles_without_graph_break():
    """The BOS decision stays on the device: fullgraph compilation must not break on it."""
    c_all = _make_case(SHAPES[0], "pads-at-end", True)
    c_some = _make_case(SHAPES[0], "pads-at-end", False)

    def f(h, w, s, t):
        return rkhf.rag_sequence_get_nll(
            h,
            w,
            s,
            t,
            pad_token_id=PAD,
            bos_token_id=BOS,
            exclude_bos_score=True,
            epsilon=0.1,
            impl="reference",
        )

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=False)
    for c in (c_all, c_some):  # same shapes, both branches, one graph
        args = (c["hidden"], c["weight"], c["scores"], c["target"])
        theirs = _hf_loss(c, False, BOS, epsilon=0.1, exclude_bos_score=True)
        torch.testing.assert_close(compiled(*args), theirs, rtol=1e-12, atol=0)
