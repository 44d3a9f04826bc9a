"""rag_loss end to end: against a materialising oracle, the K=1 reduction to PyTorch's
label-smoothed cross-entropy, every impl against the reference, and bad input."""

import pytest
import torch
import torch.nn.functional as F

import rag_kernels as rk
from toolkit import impl_params, make_rag

IMPLS = impl_params("linear_logprob")


def oracle(hidden, weight, target, scores, doc_mask, mode, eps):
    """Materialise [B,K,T,V] log-probs and apply the documented definitions directly."""
    B, K, T, _ = hidden.shape
    V = weight.shape[0]
    logp = F.log_softmax(hidden @ weight.T, dim=-1)  # [B,K,T,V]
    prior = F.log_softmax(scores.masked_fill(~doc_mask, float("-inf")), dim=-1)  # [B,K]
    m = target != -100
    y = target.clamp(min=0)
    lp = logp.gather(-1, y[:, None, :, None].expand(B, K, T, 1))[..., 0]  # [B,K,T]
    lp = lp.masked_fill(~m[:, None, :], 0.0)
    if mode == "sequence":
        nll = -torch.logsumexp((prior + lp.sum(-1)).masked_fill(~doc_mask, float("-inf")), -1)
        S = logp.sum(-1).masked_fill(~m[:, None, :], 0.0)
        smooth = -torch.logsumexp((prior + S.sum(-1)).masked_fill(~doc_mask, float("-inf")), -1)
    else:
        marg = torch.logsumexp(
            (prior[:, :, None, None] + logp).masked_fill(
                ~doc_mask[:, :, None, None], float("-inf")
            ),
            dim=1,
        )  # [B,T,V]
        nll = -(marg.gather(-1, y[..., None])[..., 0] * m).sum(-1)
        smooth = -(marg.sum(-1) * m).sum(-1)
    return (1 - eps) * nll + eps / V * smooth


@pytest.mark.parametrize("eps", [0.0, 0.1], ids=["eps0", "eps0.1"])
@pytest.mark.parametrize("mode", ["sequence", "token"])
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_oracle(impl, mode, eps):
    dtype = torch.float64 if impl != "triton" else torch.float32
    hidden, weight, target, scores, dm = make_rag(2, 3, 7, 5, 29, dtype=dtype)
    got = rk.rag_loss(
        hidden,
        weight,
        target,
        scores,
        mode=mode,
        label_smoothing=eps,
        doc_mask=dm,
        reduction="none",
        impl=impl,
    )
    want = oracle(hidden.double(), weight.double(), target, scores.double(), dm, mode, eps)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_single_document_is_label_smoothed_cross_entropy(mode, eps):
    hidden, weight, target, scores, _ = make_rag(3, 1, 6, 4, 17)
    got = rk.rag_loss(
        hidden, weight, target, scores, mode=mode, label_smoothing=eps, reduction="none"
    )
    logits = hidden[:, 0] @ weight.T
    want = F.cross_entropy(
        logits.transpose(1, 2), target, label_smoothing=eps, reduction="none"
    ).sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.1], ids=["eps0", "eps0.1"])
@pytest.mark.parametrize("mode", ["sequence", "token"])
@pytest.mark.parametrize("impl", impl_params("linear_logprob", ("cpu", "triton")))
def test_fast_paths_match_reference_gradients(impl, mode, eps):
    hidden, weight, target, scores, dm = make_rag(2, 3, 9, 6, 37, dtype=torch.float32)
    up = torch.tensor([0.3, 1.7])
    res = {}
    for name in (impl, "reference"):
        h, w, s = (x.clone().requires_grad_() for x in (hidden, weight, scores))
        loss = rk.rag_loss(
            h,
            w,
            target,
            s,
            mode=mode,
            label_smoothing=eps,
            doc_mask=dm,
            reduction="none",
            impl=name,
        )
        (loss * up).sum().backward()
        res[name] = (loss, h.grad, w.grad, s.grad)
    for a, b in zip(res[impl], res["reference"], strict=False):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5)


def test_gradcheck_reference():
    hidden, weight, target, scores, dm = make_rag(2, 3, 4, 3, 7)
    args = [x.clone().requires_grad_() for x in (hidden, weight, scores)]
    for mode in ("sequence", "token"):
        fn = lambda h, w, s, mode=mode: rk.rag_loss(
            h,
            w,
            target,
            s,
            mode=mode,
            label_smoothing=0.1,
            doc_mask=dm,
            reduction="none",
            impl="reference",
        )
        assert torch.autograd.gradcheck(fn, args)


def _args():
    h, w, y, s, dm = make_rag(2, 3, 4, 5, 11, dtype=torch.float32)
    return dict(hidden=h, weight=w, target=y, doc_scores=s, doc_mask=dm)


def _with(**kw):
    d = _args()
    d.update(kw)
    return d


BAD = {
    "hidden_rank": (_with(hidden=torch.zeros(6, 4, 5)), ValueError, "hidden"),
    "K_mismatch": (_with(doc_scores=torch.zeros(2, 4)), ValueError, "doc_scores"),
    "target_shape": (_with(target=torch.zeros(2, 5, dtype=torch.long)), ValueError, "target"),
    "target_range": (_with(target=torch.full((2, 4), 11)), ValueError, "target"),
    "target_dtype": (_with(target=torch.zeros(2, 4)), TypeError, "target"),
    "weight_H": (_with(weight=torch.zeros(11, 4)), ValueError, "weight"),
    "weight_dtype": (_with(weight=torch.zeros(11, 5, dtype=torch.float16)), TypeError, "weight"),
    "all_masked": (_with(doc_mask=torch.tensor([[False] * 3, [True] * 3])), ValueError, "doc_mask"),
    "inf_score": (
        _with(doc_scores=torch.tensor([[float("inf"), 0, 0], [0, 0, 0]])),
        ValueError,
        "doc_scores",
    ),
    "mode": (_with(mode="tokens"), ValueError, "mode"),
    "smoothing": (_with(label_smoothing=1.0), ValueError, "label_smoothing"),
    "reduction": (_with(reduction="batchmean"), ValueError, "reduction"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case):
    kw, exc, name = BAD[case]
    kw = dict(kw)
    with pytest.raises(exc, match=name):
        rk.rag_loss(
            kw.pop("hidden"), kw.pop("weight"), kw.pop("target"), kw.pop("doc_scores"), **kw
        )


@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_grad_skip_eps_bound(mode):
    hidden, weight, target, scores, _ = make_rag(2, 4, 6, 5, 23)
    scores = scores.clone()
    scores[:, 1:] -= 12.0  # documents 1..3 get a negligible posterior
    eps = 1e-3
    res = {}
    for e in (0.0, eps):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = rk.rag_loss(
            h, w, target, scores, mode=mode, grad_skip_eps=e, reduction="sum", impl="reference"
        )
        loss.backward()
        res[e] = (loss.detach(), h.grad, w.grad)
    assert res[eps][0] == res[0.0][0]  # the value is exact
    m = target != -100
    post = rk.document_posterior(
        rk.linear_logprob(hidden, weight, target[:, None].expand(2, 4, 6)),
        scores,
        token_mask=m,
        mode=mode,
    )
    skipped = (post < eps)[..., None].expand(2, 4, 6) if mode == "sequence" else post < eps
    skipped = skipped & m[:, None, :]
    assert skipped.any() and (~skipped & m[:, None, :]).any()
    assert (res[eps][1][skipped] == 0).all()  # skipped rows get nothing through the LM head
    diff = (res[eps][1] - res[0.0][1]).abs()
    bound = 2 * eps * weight.abs().max()  # |g_b| = 1 with reduction="sum"
    assert (diff <= bound).all() and diff.max() > 0
    n_skipped = skipped.sum()
    wbound = 2 * eps * hidden.abs().max() * n_skipped
    assert ((res[eps][2] - res[0.0][2]).abs() <= wbound).all()


def test_generator_feedback():
    hidden, weight, target, _, _ = make_rag(2, 3, 7, 5, 19)
    fb = rk.generator_feedback(hidden.requires_grad_(), weight, target)
    assert not fb.token_logprobs.requires_grad
    m = target != -100
    for b in range(2):
        for k in range(3):
            lp = -F.cross_entropy(hidden[b, k].detach() @ weight.T, target[b], reduction="none")
            torch.testing.assert_close(fb.token_logprobs[b, k], lp)
            torch.testing.assert_close(fb.sum_logprob[b, k], lp.sum())
            torch.testing.assert_close(fb.mean_logprob[b, k], lp.sum() / m[b].sum())
