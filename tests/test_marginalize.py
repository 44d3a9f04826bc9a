"""rag_sequence_loss / rag_token_loss: C++ vs reference, gradcheck, the gradient identities of
docs/design.md §2.2, property tests, masking, and bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rag_kernels as rk
from rag_kernels.ops.marginalize import reference as ref
from toolkit import impl_params, make_marginalize, require_impl

MODES = {"sequence": rk.rag_sequence_loss, "token": rk.rag_token_loss}
IMPLS = impl_params("marginalize")  # triton: CPU tensors under TRITON_INTERPRET=1 (conftest)


def naive_loss(lp, s, tm, dm, mode):
    """Loop-level oracle written independently of the reference."""
    out = []
    for b in range(lp.shape[0]):
        ks = [k for k in range(lp.shape[1]) if dm[b, k]]
        zs = [math.exp(s[b, k].item()) for k in ks]
        prior = {k: z / sum(zs) for k, z in zip(ks, zs, strict=False)}
        ts = [t for t in range(lp.shape[2]) if tm[b, t]]
        if mode == "sequence":
            tot = sum(prior[k] * math.exp(sum(lp[b, k, t].item() for t in ts)) for k in ks)
            out.append(-math.log(tot))
        else:
            out.append(
                -sum(math.log(sum(prior[k] * math.exp(lp[b, k, t].item()) for k in ks)) for t in ts)
            )
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "shape", [(1, 1, 1), (3, 5, 7), (4, 8, 13)], ids=lambda s: "B{}K{}T{}".format(*s)
)
def test_matches_naive_loop(mode, impl, shape):
    lp, s, tm, dm = make_marginalize(*shape)
    got = MODES[mode](lp, s, token_mask=tm, doc_mask=dm, reduction="none", impl=impl)
    torch.testing.assert_close(got, naive_loss(lp, s, tm, dm, mode), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("masks", ["none", "tok", "doc", "both"])
@pytest.mark.parametrize("impl", impl_params("marginalize", ("cpu", "triton")))
def test_fast_impls_match_reference_with_weighted_backward(impl, mode, masks, dtype):
    lp, s, tm, dm = make_marginalize(5, 7, 11, dtype=dtype)
    tm = tm if masks in ("tok", "both") else None
    dm = dm if masks in ("doc", "both") else None
    upstream = torch.rand(5, dtype=torch.float64) + 0.1  # non-uniform per-query weights
    res = {}
    for name in (impl, "reference"):
        a, b = lp.clone().requires_grad_(), s.clone().requires_grad_()
        loss = MODES[mode](a, b, token_mask=tm, doc_mask=dm, reduction="none", impl=name)
        assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        (loss * upstream.to(loss.dtype)).sum().backward()
        assert a.grad.dtype == dtype and b.grad.dtype == dtype
        res[name] = (loss, a.grad, b.grad)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for x, y in zip(res[impl], res["reference"], strict=False):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck(mode, impl):
    lp, s, tm, dm = make_marginalize(2, 3, 4)
    lp.requires_grad_()
    s.requires_grad_()
    fn = lambda a, b: MODES[mode](a, b, token_mask=tm, doc_mask=dm, reduction="none", impl=impl)
    assert torch.autograd.gradcheck(fn, (lp, s))


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_identities(mode, impl):
    """dloss/ds = prior - posterior (summed over tokens in token mode); dloss/dlp = -posterior*m."""
    lp, s, tm, dm = make_marginalize(3, 6, 9)
    lp.requires_grad_()
    s.requires_grad_()
    loss = MODES[mode](lp, s, token_mask=tm, doc_mask=dm, reduction="sum", impl=impl)
    g_lp, g_s = torch.autograd.grad(loss, (lp, s))
    post = rk.document_posterior(lp, s, token_mask=tm, doc_mask=dm, mode=mode)
    prior = torch.softmax(s.detach().masked_fill(~dm, float("-inf")), dim=-1)
    m = tm[:, None, :].double()
    if mode == "sequence":
        torch.testing.assert_close(g_s, prior - post, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g_lp, -post[:, :, None] * m, rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(
            g_s, ((prior[:, :, None] - post) * m).sum(-1), rtol=1e-12, atol=1e-12
        )
        torch.testing.assert_close(g_lp, -post * m, rtol=1e-12, atol=1e-12)
    # posterior is a distribution over the kept documents, zero on masked ones
    assert torch.all(
        post.masked_select(~dm[:, :, None].expand_as(post) if post.dim() == 3 else ~dm) == 0
    )


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("impl", IMPLS)
def test_masked_entries_cannot_leak(mode, impl):
    """NaN in masked tokens / documents changes neither loss nor gradients."""
    lp, s, tm, dm = make_marginalize(3, 5, 6)
    poisoned_lp = lp.clone()
    poisoned_lp[~tm[:, None, :].expand_as(lp)] = float("nan")
    poisoned_lp[~dm] = float("nan")
    poisoned_s = s.clone()
    poisoned_s[~dm] = float("-inf")
    outs = []
    for a, b in ((lp, s), (poisoned_lp, poisoned_s)):
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        loss = MODES[mode](a, b, token_mask=tm, doc_mask=dm, reduction="none", impl=impl)
        loss.backward(torch.linspace(0.5, 2.0, 3, dtype=torch.float64))
        outs.append((loss, a.grad, b.grad))
    for x, y in zip(*outs, strict=False):
        assert torch.isfinite(y).all()
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_reductions(reduction):
    lp, s, tm, dm = make_marginalize(4, 3, 5)
    per_query = rk.rag_sequence_loss(lp, s, token_mask=tm, doc_mask=dm, reduction="none")
    got = rk.rag_sequence_loss(lp, s, token_mask=tm, doc_mask=dm, reduction=reduction)
    want = {"none": per_query, "sum": per_query.sum(), "mean": per_query.mean()}[reduction]
    torch.testing.assert_close(got, want)


def test_single_document_is_plain_nll():
    lp, s, tm, _ = make_marginalize(3, 1, 8)
    want = -(lp[:, 0] * tm).sum(-1)
    for fn in MODES.values():
        torch.testing.assert_close(fn(lp, s, token_mask=tm, reduction="none"), want)


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 4),
    K=st.integers(1, 6),
    T=st.integers(1, 9),
    seed=st.integers(0, 2**16),
    shift=st.floats(-50, 50),
    mode=st.sampled_from(list(MODES)),
    impl=st.sampled_from(rk.available_impls("marginalize")),
)
def test_properties(B, K, T, seed, shift, mode, impl):
    lp, s, tm, dm = make_marginalize(B, K, T, seed=seed, p_tok=0.6, p_doc=0.6)
    base = MODES[mode](lp, s, token_mask=tm, doc_mask=dm, reduction="none", impl=impl)
    assert torch.isfinite(base).all()
    assert (base >= -1e-9).all()  # log-probs <= 0 make every loss non-negative
    shifted = MODES[mode](lp, s + shift, token_mask=tm, doc_mask=dm, reduction="none", impl=impl)
    torch.testing.assert_close(shifted, base, rtol=1e-10, atol=1e-10)
    per_query = s + torch.randn(B, 1, dtype=s.dtype) * 10  # a different constant per query
    torch.testing.assert_close(
        MODES[mode](lp, per_query, token_mask=tm, doc_mask=dm, reduction="none", impl=impl),
        base,
        rtol=1e-10,
        atol=1e-10,
    )


def test_reference_is_float64_and_autocasts_low_precision():
    lp, s, _, _ = make_marginalize(2, 3, 4, dtype=torch.float16)
    assert rk.rag_token_loss(lp, s, impl="reference").dtype == torch.float32
    lp, s, _, _ = make_marginalize(2, 3, 4)
    assert ref.rag_sequence_loss_reference(lp, s).dtype == torch.float64


# ----------------------------------------------------------------------------- bad input
def _ok():
    lp, s, tm, dm = make_marginalize(2, 3, 4)
    return dict(token_logprobs=lp, doc_scores=s, token_mask=tm, doc_mask=dm)


def _with(**kw):
    d = _ok()
    d.update(kw)
    return d


BAD = {
    "lp_rank": (_with(token_logprobs=torch.zeros(2, 3)), ValueError, "token_logprobs"),
    "lp_int": (
        _with(token_logprobs=torch.zeros(2, 3, 4, dtype=torch.long)),
        TypeError,
        "token_logprobs",
    ),
    "lp_not_tensor": (_with(token_logprobs=[[0.0]]), TypeError, "token_logprobs"),
    "scores_rank": (_with(doc_scores=torch.zeros(2, 3, 1)), ValueError, "doc_scores"),
    "K_mismatch": (
        _with(doc_scores=torch.zeros(2, 4, dtype=torch.float64)),
        ValueError,
        "doc_scores",
    ),
    "B_mismatch": (
        _with(doc_scores=torch.zeros(3, 3, dtype=torch.float64)),
        ValueError,
        "doc_scores",
    ),
    "tok_mask_shape": (
        _with(token_mask=torch.ones(2, 5, dtype=torch.bool)),
        ValueError,
        "token_mask",
    ),
    "tok_mask_dtype": (_with(token_mask=torch.ones(2, 4)), TypeError, "token_mask"),
    "doc_mask_shape": (_with(doc_mask=torch.ones(2, 2, dtype=torch.bool)), ValueError, "doc_mask"),
    "device": (
        _with(doc_scores=torch.zeros(2, 3, dtype=torch.float64, device="meta")),
        ValueError,
        "doc_scores",
    ),
    "all_docs_masked": (
        _with(doc_mask=torch.tensor([[True, False, False], [False] * 3])),
        ValueError,
        "doc_mask",
    ),
    "nan_score": (
        _with(
            doc_scores=torch.tensor([[0.0, float("nan"), 0.0], [0.0] * 3], dtype=torch.float64),
            doc_mask=None,
        ),
        ValueError,
        "doc_scores",
    ),
    "pinf_score": (
        _with(
            doc_scores=torch.tensor([[0.0, float("inf"), 0.0], [0.0] * 3], dtype=torch.float64),
            doc_mask=None,
        ),
        ValueError,
        "doc_scores",
    ),
    "ninf_unmasked": (
        _with(
            doc_scores=torch.tensor([[0.0, float("-inf"), 0.0], [0.0] * 3], dtype=torch.float64),
            doc_mask=None,
        ),
        ValueError,
        "doc_scores",
    ),
    "nan_on_masked_doc": (
        _with(
            doc_scores=torch.tensor([[0.0, float("nan"), 0.0], [0.0] * 3], dtype=torch.float64),
            doc_mask=torch.tensor([[True, False, True], [True] * 3]),
        ),
        ValueError,
        "doc_scores",
    ),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case, mode):
    kwargs, exc, name = BAD[case]
    kwargs = dict(kwargs)
    lp, s = kwargs.pop("token_logprobs"), kwargs.pop("doc_scores")
    with pytest.raises(exc, match=name):
        MODES[mode](lp, s, **kwargs)


@pytest.mark.parametrize("arg,value", [("reduction", "avg"), ("impl", "cuda")])
def test_bad_options(arg, value):
    d = _ok()
    with pytest.raises(ValueError, match=arg):
        rk.rag_sequence_loss(d["token_logprobs"], d["doc_scores"], **{arg: value})


def test_ninf_on_masked_document_is_allowed():
    d = _ok()
    s = d["doc_scores"].clone()
    s[~d["doc_mask"]] = float("-inf")
    out = rk.rag_sequence_loss(
        d["token_logprobs"], s, token_mask=d["token_mask"], doc_mask=d["doc_mask"]
    )
    assert torch.isfinite(out)


def test_value_checks_can_be_disabled():
    lp, s, _, _ = make_marginalize(2, 3, 4)
    s[0, 1] = float("nan")
    rk.set_value_checks(False)
    try:
        assert torch.isnan(rk.rag_sequence_loss(lp, s, reduction="none")[0])  # NaN propagates
    finally:
        rk.set_value_checks(True)


def test_torch_compile_cpu_path():
    require_impl("marginalize", "cpu")
    lp, s, tm, dm = make_marginalize(3, 4, 5, dtype=torch.float32)
    fn = torch.compile(lambda a, b: rk.rag_token_loss(a, b, token_mask=tm, doc_mask=dm, impl="cpu"))
    a = lp.clone().requires_grad_()
    out = fn(a, s)
    out.backward()
    b = lp.clone().requires_grad_()
    want = rk.rag_token_loss(b, s, token_mask=tm, doc_mask=dm, impl="reference")
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize(
    "fn",
    [
        lambda lp, s: rk.rag_sequence_loss(lp, s, impl="reference"),
        lambda lp, s: rk.rag_token_loss(lp, s, impl="reference"),
        rk.document_posterior,
    ],
    ids=["sequence", "token", "posterior"],
)
def test_vmap_over_doc_scores_with_value_checks_on(fn):
    """torch.func.vmap over doc_scores (reference impl): the value checks' flags are batched,
    and reading them failed with "Cannot access data pointer"; they are skipped there."""
    lp, s, _, _ = make_marginalize(2, 3, 4)
    ss = torch.stack([s, s * 0.5, s - 1.0])
    got = torch.func.vmap(lambda x: fn(lp, x))(ss)
    want = torch.stack([fn(lp, x) for x in ss])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
