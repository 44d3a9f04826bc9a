"""rk.contrastive_loss: reference vs sentence-transformers / hand-written losses, fused C++ and
Triton kernels vs the reference, masking semantics, learnable scale, bad inputs."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import rag_kernels as rk  # noqa: E402
from rag_kernels.ops.contrastive import contrastive_loss  # noqa: E402
from toolkit import (  # noqa: E402
    assert_close,
    impl_params,
    make_contrastive,
    nan_filled_empty,
    require_impl,  # noqa: E402
)

FUSED = impl_params("contrastive", ("cpu", "triton"))


@pytest.fixture
def nan_empty():
    """torch.empty / at::empty / resize_ return NaN-filled memory: an unwritten output fails."""
    with nan_filled_empty():
        yield


def _leaf(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype).requires_grad_(True)


def _grads(loss, tensors, retain_graph=False):
    return torch.autograd.grad(loss, tensors, allow_unused=True, retain_graph=retain_graph)


# ------------------------------------------------------------------ sentence-transformers parity


def _mnrl(symmetric):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    kwargs = dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")
    # the model is only stored by the constructor; compute_loss_from_embeddings never calls it
    return MultipleNegativesRankingLoss(
        torch.nn.Identity(), scale=20.0, **(kwargs if symmetric else {})
    )


@pytest.mark.parametrize("symmetric", [False, True], ids=["q2d", "symmetric"])
@pytest.mark.parametrize("impl", ["reference", *FUSED])
def test_matches_sentence_transformers_mnrl(impl, symmetric):
    dt = torch.float32 if impl == "triton" else torch.float64
    B, D = 11, 9
    q, pos, neg = _leaf(B, D, dtype=dt), _leaf(B, D, dtype=dt), _leaf(B, D, dtype=dt)
    ref = _mnrl(symmetric).compute_loss_from_embeddings([q, pos, neg], None)
    ours = contrastive_loss(q, torch.cat([pos, neg]), symmetric=symmetric, impl=impl)
    tol = dict(rtol=1e-5, atol=1e-6) if dt == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours, ref, **tol)
    for a, b in zip(_grads(ours, [q, pos, neg]), _grads(ref, [q, pos, neg]), strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_symmetric_matches_deprecated_symmetric_class():
    from sentence_transformers.sentence_transformer.losses import (
        MultipleNegativesSymmetricRankingLoss,
    )

    B, D = 6, 5
    q, pos = _leaf(B, D), _leaf(B, D)
    ref = MultipleNegativesSymmetricRankingLoss(torch.nn.Identity()).compute_loss_from_embeddings(
        [q, pos], None
    )
    torch.testing.assert_close(contrastive_loss(q, pos, symmetric=True, impl="reference"), ref)


# ------------------------------------------------------------------ hand-written ground truths


@pytest.mark.parametrize("impl", ["reference", *FUSED])
def test_dpr_dot_nll_with_hard_negatives(impl):
    dt = torch.float32 if impl == "triton" else torch.float64
    B, D, n_hard = 7, 13, 3
    q = _leaf(B, D, dtype=dt)
    docs = _leaf(B * (1 + n_hard), D, dtype=dt)  # [positives; hard negatives]
    target = torch.arange(B)
    w = torch.rand(B, dtype=dt)
    ref = F.cross_entropy(q @ docs.t(), target, reduction="none")
    ours = contrastive_loss(
        q, docs, target, scale=1.0, similarity="dot", reduction="none", impl=impl
    )
    torch.testing.assert_close(ours, ref.to(ours.dtype))
    for a, b in zip(
        _grads((ours * w).sum(), [q, docs]), _grads((ref * w).sum(), [q, docs]), strict=True
    ):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("impl", ["reference", *FUSED])
def test_multi_positive_marginal_likelihood(impl):
    dt = torch.float32 if impl == "triton" else torch.float64
    B, M, D = 5, 17, 6
    q, d = _leaf(B, D, dtype=dt), _leaf(M, D, dtype=dt)
    mask = torch.rand(B, M) < 0.3
    mask[torch.arange(B), torch.arange(B) * 3] = True
    S = 20.0 * F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).t()
    ref = torch.logsumexp(S, 1) - torch.logsumexp(S.masked_fill(~mask, float("-inf")), 1)
    ours = contrastive_loss(q, d, mask, reduction="none", impl=impl)
    torch.testing.assert_close(ours, ref)
    w = torch.rand(B, dtype=dt)
    for a, b in zip(_grads((ours * w).sum(), [q, d]), _grads((ref * w).sum(), [q, d]), strict=True):
        torch.testing.assert_close(a, b)


def test_single_positive_mask_equals_index():
    B, M, D = 6, 10, 4
    q, d = _leaf(B, D), _leaf(M, D)
    idx = torch.randint(0, M, (B,))
    mask = F.one_hot(idx, M).bool()
    ids = torch.randint(0, 5, (M,))
    a = contrastive_loss(q, d, idx, doc_ids=ids, reduction="none", impl="reference")
    b = contrastive_loss(q, d, mask, doc_ids=ids, reduction="none", impl="reference")
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("impl", ["reference", *FUSED])
def test_doc_ids_duplicate_equals_removed(impl):
    """A false negative (same id as the positive, *different* embedding) leaves the
    denominator: the loss equals the loss without that candidate, and it gets no gradient."""
    dt = torch.float32 if impl == "triton" else torch.float64
    B, D = 5, 7
    q = _leaf(B, D, dtype=dt)
    docs = torch.randn(B + 4, D, dtype=dt)  # B positives + 4 hard negatives
    with torch.no_grad():  # a strong false negative: close to query 2, far from the others
        docs[B + 1] = q[2] + 0.3 * torch.randn(D, dtype=dt)
    docs.requires_grad_(True)
    ids = torch.arange(B + 4)
    ids[B + 1] = ids[2]  # hard negative B+1 is another copy of query 2's positive
    full = contrastive_loss(q, docs, doc_ids=ids, reduction="none", impl=impl)
    keep = [j for j in range(B + 4) if j != B + 1]
    removed = contrastive_loss(q, docs[keep], reduction="none", impl="reference")
    plain = contrastive_loss(q, docs, reduction="none", impl="reference")
    torch.testing.assert_close(full[2], removed[2].to(full.dtype))
    torch.testing.assert_close(full[[0, 1, 3, 4]], plain[[0, 1, 3, 4]].to(full.dtype))
    assert full[2] < plain[2].to(full.dtype)
    # the duplicate is still an ordinary negative for every other query
    g_all = _grads(full.sum(), [docs], retain_graph=True)[0]
    g2 = _grads(full[2], [docs])[0]
    assert g2[B + 1].abs().max() == 0
    assert g_all[B + 1].abs().max() > 0


@pytest.mark.parametrize("impl", ["reference", *FUSED])
def test_doc_ids_multi_positive(impl):
    """Mask mode: candidates sharing an id with any positive (and not positives) are dropped."""
    dt = torch.float32 if impl == "triton" else torch.float64
    B, M, D = 4, 12, 5
    q, d = _leaf(B, D, dtype=dt), _leaf(M, D, dtype=dt)
    ids = torch.tensor([0, 1, 2, 3, 0, 5, 6, 1, 8, 9, 2, 11])
    mask = torch.zeros(B, M, dtype=torch.bool)
    mask[0, [0, 5]] = True  # query 0: id 0 (dup at 4) and id 5
    mask[1, [1, 7]] = True  # query 1: both copies of id 1 are positives
    mask[2, 2] = True  # query 2: id 2 (dup at 10)
    mask[3, 3] = True
    S = 20.0 * F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).t()
    excl = torch.zeros(B, M, dtype=torch.bool)
    excl[0, 4] = True
    excl[2, 10] = True
    ref = torch.logsumexp(S.masked_fill(excl, float("-inf")), 1) - torch.logsumexp(
        S.masked_fill(~mask, float("-inf")), 1
    )
    ours = contrastive_loss(q, d, mask, doc_ids=ids, reduction="none", impl=impl)
    torch.testing.assert_close(ours, ref)


def test_symmetric_doc_ids_masks_other_queries_sharing_the_positive():
    B, D = 4, 6
    q, docs = _leaf(B, D), _leaf(B, D)
    ids = torch.tensor([7, 8, 7, 9])  # queries 0 and 2 have the same positive document id
    ours = contrastive_loss(
        q, docs, doc_ids=ids, symmetric=True, reduction="none", impl="reference"
    )
    S = 20.0 * F.normalize(q, dim=-1) @ F.normalize(docs, dim=-1).t()
    same = ids[:, None] == ids[None, :]
    off = ~torch.eye(B, dtype=torch.bool)
    row = torch.logsumexp(S.masked_fill(same & off, float("-inf")), 1) - S.diag()
    col = torch.logsumexp(S.masked_fill(same & off, float("-inf")), 0) - S.diag()
    torch.testing.assert_close(ours, 0.5 * (row + col))


# ------------------------------------------------------------------ learnable scale, gradcheck


@pytest.mark.parametrize("impl", ["reference", *FUSED])
def test_learnable_scale_gets_gradient(impl):
    dt = torch.float32 if impl == "triton" else torch.float64
    B, D = 6, 5
    q, d = _leaf(B, D, dtype=dt), _leaf(2 * B, D, dtype=dt)
    log_scale = torch.tensor(2.5, dtype=dt, requires_grad=True)
    loss = contrastive_loss(q, d, scale=log_scale.exp(), symmetric=True, impl=impl)
    (g,) = _grads(loss, [log_scale])
    # finite difference of the reference
    h = 1e-3 if dt == torch.float32 else 1e-6
    with torch.no_grad():
        fd = (
            contrastive_loss(
                q.double(),
                d.double(),
                scale=float((log_scale.double() + h).exp()),
                symmetric=True,
                impl="reference",
            )
            - contrastive_loss(
                q.double(),
                d.double(),
                scale=float((log_scale.double() - h).exp()),
                symmetric=True,
                impl="reference",
            )
        ) / (2 * h)
    assert g is not None and g.abs() > 0
    torch.testing.assert_close(
        g.double(), fd, rtol=1e-3 if dt == torch.float32 else 1e-6, atol=1e-6
    )


GRADCHECK_CASES = {
    "cos": dict(),
    "dot_index": dict(similarity="dot", scale=0.7, positives="index"),
    "symmetric_ids": dict(symmetric=True, doc_ids="ids"),
    "mask_ids": dict(positives="mask", doc_ids="ids"),
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES), ids=list(GRADCHECK_CASES))
@pytest.mark.parametrize("impl", impl_params("contrastive", ("reference", "cpu")))
def test_gradcheck_float64(impl, case):
    kw = dict(GRADCHECK_CASES[case])
    B, M, D = 4, 7, 3
    q, d = _leaf(B, D), _leaf(M, D)
    scale = torch.tensor(float(kw.pop("scale", 3.0)), dtype=torch.float64, requires_grad=True)
    if kw.get("positives") == "index":
        kw["positives"] = torch.tensor([6, 0, 3, 3])
    elif kw.get("positives") == "mask":
        m = torch.zeros(B, M, dtype=torch.bool)
        m[[0, 0, 1, 2, 3, 3], [0, 4, 1, 2, 3, 6]] = True
        kw["positives"] = m
    if kw.get("doc_ids") == "ids":
        kw["doc_ids"] = torch.tensor([0, 1, 2, 0, 4, 1, 6])
    fn = lambda q, d, s: contrastive_loss(q, d, scale=s, reduction="none", impl=impl, **kw)
    assert torch.autograd.gradcheck(fn, (q, d, scale))


# ------------------------------------------------------------------ fused kernels vs reference

FUSED_CASES = {
    "cos_pairs": dict(M=23),
    "cos_hardneg_ids": dict(M=61, doc_ids=True),
    "dot_index": dict(M=40, similarity="dot", scale=1.0, positives="index"),
    "symmetric": dict(M=46, symmetric=True),
    "symmetric_ids_dupindex": dict(M=33, symmetric=True, doc_ids=True, positives="index"),
    "multi_pos": dict(M=29, positives="mask"),
    "multi_pos_ids": dict(M=52, positives="mask", doc_ids=True),
}


@pytest.mark.parametrize("case", list(FUSED_CASES), ids=list(FUSED_CASES))
@pytest.mark.parametrize("impl", FUSED)
def test_fused_matches_reference_weighted(impl, case, nan_empty):
    kw = dict(FUSED_CASES[case])
    B, D = 21, 19
    M = kw.pop("M")
    scale = kw.pop("scale", 20.0)
    dt = torch.float32
    # index positives: queries 3 and 5 share one; doc ids in [0, M // 2): duplicates
    q64, d64, pos, ids, w = make_contrastive(
        B, M, D, positives=kw.pop("positives", None), doc_ids=kw.pop("doc_ids", False)
    )
    kw.update(positives=pos, doc_ids=ids)

    def run(impl_, dtype):
        q = q64.to(dtype).requires_grad_(True)
        d = d64.to(dtype).requires_grad_(True)
        s = torch.tensor(scale, dtype=dtype, requires_grad=True)
        loss = contrastive_loss(q, d, scale=s, reduction="none", impl=impl_, **kw)
        grads = torch.autograd.grad((loss * w.to(loss.dtype)).sum(), [q, d, s])
        return [loss.double(), *[g.double() for g in grads]]

    exact = run("reference", torch.float64)
    plain = run("reference", dt)
    ours = run(impl, dt)
    for name, e, p, o in zip(["loss", "dq", "dd", "dscale"], exact, plain, ours, strict=True):
        assert torch.isfinite(o).all(), name
        assert_close(o, e, ref=p, rtol=1e-5, atol=1e-5, name=name)


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_reductions(impl, reduction):
    B, M, D = 9, 18, 8
    q, d = _leaf(B, D, dtype=torch.float32), _leaf(M, D, dtype=torch.float32)
    a = contrastive_loss(q, d, reduction=reduction, impl=impl)
    b = contrastive_loss(q, d, reduction=reduction, impl="reference")
    torch.testing.assert_close(a, b)
    for x, y in zip(_grads(a * 1.7, [q, d]), _grads(b * 1.7, [q, d]), strict=True):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("impl", FUSED)
def test_half_precision_inputs(impl, dtype):
    B, M, D = 8, 16, 16
    dev = "cuda" if impl == "triton" and torch.cuda.is_available() else "cpu"
    q = torch.randn(B, D, device=dev).to(dtype).requires_grad_(True)
    d = torch.randn(M, D, device=dev).to(dtype).requires_grad_(True)
    loss = contrastive_loss(q, d, impl=impl)
    ref = contrastive_loss(q.float(), d.float(), impl="reference")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)
    gq, gd = _grads(loss, [q, d])
    assert gq.dtype == dtype and gd.dtype == dtype
    rq, rd = _grads(ref, [q, d])
    torch.testing.assert_close(gq.float(), rq.float(), rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(gd.float(), rd.float(), rtol=5e-2, atol=5e-2)


def test_cpu_multi_tile_matches_reference():
    """Shapes beyond one 128 x 1024 block of the C++ kernel (tile edges, several threads)."""
    require_impl("contrastive", "cpu")
    B, M, D = 261, 2100, 7
    q, d = _leaf(B, D), _leaf(M, D)
    ids = torch.randint(0, 1500, (M,))
    w = torch.rand(B, dtype=torch.float64)
    out = []
    for impl in ["reference", "cpu"]:
        loss = contrastive_loss(q, d, doc_ids=ids, symmetric=True, reduction="none", impl=impl)
        out.append([loss, *_grads((loss * w).sum(), [q, d])])
    for a, b in zip(*out, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_never_materialises_b_by_m():
    """No single allocation of the C++ path comes near one [B, M] fp32 matrix (the naive
    path's largest is exactly that)."""
    require_impl("contrastive", "cpu")
    from torch.profiler import ProfilerActivity, profile

    B, M, D = 1024, 2048, 8
    q, d = _leaf(B, D, dtype=torch.float32), _leaf(M, D, dtype=torch.float32)

    def biggest_alloc(impl):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            contrastive_loss(q, d, impl=impl).backward()
        return max((e.cpu_memory_usage for e in prof.events()), default=0)

    assert biggest_alloc("reference") >= B * M * 4
    assert biggest_alloc("cpu") < B * M * 4 // 4


# ------------------------------------------------------------------ validation

BAD = {
    "queries_1d": (dict(queries=torch.randn(4)), ValueError, "queries"),
    "docs_int": (dict(docs=torch.ones(6, 3, dtype=torch.int64)), TypeError, "docs"),
    "d_mismatch": (dict(docs=torch.randn(6, 5)), ValueError, "docs"),
    "dtype_mismatch": (dict(docs=torch.randn(6, 3, dtype=torch.float64)), TypeError, "docs"),
    "m_lt_b": (dict(docs=torch.randn(3, 3)), ValueError, "positives"),
    "index_oob": (dict(positives=torch.tensor([0, 1, 2, 6])), ValueError, "positives"),
    "index_negative": (dict(positives=torch.tensor([0, -1, 2, 3])), ValueError, "positives"),
    "index_shape": (dict(positives=torch.tensor([0, 1])), ValueError, "positives"),
    "index_float": (dict(positives=torch.zeros(4)), TypeError, "positives"),
    "mask_shape": (dict(positives=torch.ones(4, 5, dtype=torch.bool)), ValueError, "positives"),
    "mask_empty_row": (
        dict(positives=torch.eye(4, 6, dtype=torch.bool).index_fill(0, torch.tensor([2]), False)),
        ValueError,
        "query 2",
    ),
    "symmetric_mask": (
        dict(positives=torch.eye(4, 6, dtype=torch.bool), symmetric=True),
        ValueError,
        "symmetric",
    ),
    "doc_ids_shape": (dict(doc_ids=torch.arange(5)), ValueError, "doc_ids"),
    "doc_ids_float": (dict(doc_ids=torch.zeros(6)), TypeError, "doc_ids"),
    "scale_negative": (dict(scale=-1.0), ValueError, "scale"),
    "scale_1d": (dict(scale=torch.ones(1)), ValueError, "scale"),
    "scale_str": (dict(scale="20"), TypeError, "scale"),
    "similarity": (dict(similarity="l2"), ValueError, "similarity"),
    "reduction": (dict(reduction="avg"), ValueError, "reduction"),
    "impl": (dict(impl="cuda"), ValueError, "impl"),
    "meta_docs": (dict(docs=torch.randn(6, 3, device="meta")), ValueError, "docs"),
    "empty_queries": (dict(queries=torch.randn(0, 3)), ValueError, "queries"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_inputs(case):
    over, exc, words = BAD[case]
    args = dict(queries=torch.randn(4, 3), docs=torch.randn(6, 3), positives=None)
    args.update(over)
    with pytest.raises(exc, match=words):
        contrastive_loss(args.pop("queries"), args.pop("docs"), args.pop("positives"), **args)


def test_noncontiguous_inputs_are_read_correctly():
    q = torch.randn(9, 5, dtype=torch.float64)
    d = torch.randn(5, 12, dtype=torch.float64).t()  # [12, 5], transposed view
    impls = [i for i in rk.available_impls("contrastive") if i != "triton"]
    vals = [contrastive_loss(q, d, impl=i) for i in impls]
    ref = contrastive_loss(q, d.contiguous(), impl="reference")
    for v in vals:
        torch.testing.assert_close(v, ref)


@pytest.mark.parametrize("mode", ["index_ids", "mask_ids"])
def test_cpu_ops_pass_opcheck(mode):
    """Schema, fake (meta) registrations for torch.compile, and autograd registration."""
    require_impl("contrastive", "cpu")
    B, M, D = 5, 7, 3
    q, d, s = torch.randn(B, D), torch.randn(M, D), torch.tensor(2.0)
    if mode == "index_ids":
        pos, mask, ids, table = (
            torch.tensor([0, 1, 2, 3, 6]),
            None,
            torch.tensor([0, 1, 2, 0, 4, 5, 6]),
            None,
        )
    else:
        pos, mask = None, torch.eye(B, M, dtype=torch.bool)
        ids = torch.tensor([0, 1, 2, 0, 3, 1, 4])
        table = torch.zeros(B, 5, dtype=torch.bool)
        table[torch.arange(B), ids[:B]] = True
    args = (q, d, s, pos, mask, ids, table)
    torch.library.opcheck(torch.ops.rag_kernels.contrastive_fwd.default, args)
    loss, lse, plse = torch.ops.rag_kernels.contrastive_fwd(*args)
    assert torch.isfinite(loss).all()
    bwd_args = (*args, lse, plse, torch.rand(B), True, True)
    torch.library.opcheck(torch.ops.rag_kernels.contrastive_bwd.default, bwd_args)
