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


def _st_losses():
    return pytest.importorskip("sentence_transformers.sentence_transformer.losses")


def _mnrl(symmetric):
    MultipleNegativesRankingLoss = _st_losses().MultipleNegativesRankingLoss

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
    MultipleNegativesSymmetricRankingLoss = _st_losses().MultipleNegativesSymmetricRankingLoss

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


# ------------------------------------------------------------------ Triton kernels (interpreter)
# The Triton path on its own: fp32 and bf16 against float64 under the tolerance rule, odd
# shapes, several backward chunks and forward splits (module knobs shrunk), determinism,
# padding past the ends of the inputs poisoned with NaN.

TRITON_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.fixture
def tk():
    """The Triton kernel module (skipped with the reason where it cannot run)."""
    require_impl("contrastive", "triton")
    from rag_kernels.ops import registry

    return registry.kernels("contrastive", "triton")


@pytest.fixture
def tiny_chunks(tk, monkeypatch):
    """Backward chunks of one interpreter tile (16 columns) and three forward splits."""
    monkeypatch.setattr(tk, "BWD_BUDGET_FRACTION", 0.0)
    monkeypatch.setattr(tk, "BWD_MIN_BUDGET_BYTES", 0)
    monkeypatch.setattr(tk, "FWD_SPLITS", 3)
    return tk


def _positive_args(positives, B):
    """``contrastive_core``'s ``(pos_index, pos_mask)`` for a public ``positives``."""
    if positives is None:
        return torch.arange(B), None
    if positives.dtype == torch.bool:
        return None, positives
    return positives.long(), None


def _plain_16bit(q, d, s, dtype, similarity="cos", positives=None, doc_ids=None, symmetric=False):
    """Plain PyTorch in ``dtype``: the op's fp32 normalisation, then the materialised
    ``[B, M]`` scores, log-sum-exps and autograd backward all in ``dtype``."""
    from rag_kernels.ops.contrastive.reference import (
        contrastive_loss_reference,
        similarity_inputs,
    )

    qn = similarity_inputs(q.float(), similarity).to(dtype)
    dn = similarity_inputs(d.float(), similarity).to(dtype)
    pos_index, pos_mask = _positive_args(positives, q.shape[0])
    return contrastive_loss_reference(
        qn,
        dn,
        s.to(dtype),
        similarity="dot",
        pos_index=pos_index,
        pos_mask=pos_mask,
        cand_ids=doc_ids,
        symmetric=symmetric,
    ).float()


def _loss_and_grads(impl, q64, d64, w, dtype, scale, kw, plain=False):
    """``[loss, dq, dd, dscale]`` in float64 for inputs cast to ``dtype`` (the scale is an fp32
    leaf for 16-bit inputs, so its gradient is not rounded to 16 bits)."""
    q = q64.to(dtype).requires_grad_(True)
    d = d64.to(dtype).requires_grad_(True)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    s = torch.tensor(scale, dtype=sdt, requires_grad=True)
    if plain and dtype in (torch.bfloat16, torch.float16):
        loss = _plain_16bit(q, d, s, dtype, **kw)
    else:
        loss = contrastive_loss(q, d, scale=s, reduction="none", impl=impl, **kw)
    grads = torch.autograd.grad((loss * w.to(loss.dtype)).sum(), [q, d, s])
    return [loss.detach().double(), *[g.double() for g in grads]]


def _triton_case(name, B, D):
    """A FUSED_CASES mode at ``B`` queries, ``D`` dims: float64 inputs and the op's kwargs."""
    kw = dict(FUSED_CASES[name])
    M = kw.pop("M")
    scale = kw.pop("scale", 20.0)
    q64, d64, pos, ids, w = make_contrastive(
        B, M, D, positives=kw.pop("positives", None), doc_ids=kw.pop("doc_ids", False)
    )
    kw.update(positives=pos, doc_ids=ids)
    return q64, d64, w, scale, kw


# bf16: the normalised embeddings are rounded to bf16 before the products (as in plain
# PyTorch), an error of up to ~2^-8 of each quantity's scale that the two paths draw
# differently; on a tiny problem plain PyTorch can be luckily close, hence the rtol.
_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2**-8, atol=1e-3)}


def _check_vs_float64(ours, q64, d64, w, dtype, scale, kw, label=""):
    to64 = lambda x: x.to(dtype).double()  # the ground truth sees the same rounded inputs
    exact = _loss_and_grads("reference", to64(q64), to64(d64), w, torch.float64, scale, kw)
    plain = _loss_and_grads("reference", q64, d64, w, dtype, scale, kw, plain=True)
    for name, o, e, p in zip(["loss", "dq", "dd", "dscale"], ours, exact, plain, strict=True):
        assert torch.isfinite(o).all(), f"{label}{name}"
        assert_close(o, e, ref=p, name=f"{label}{name}", **_TOL[dtype])


@pytest.mark.parametrize("case", list(FUSED_CASES), ids=list(FUSED_CASES))
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
def test_triton_matches_float64(tk, case, dtype, nan_empty):
    """Every mode (cos / dot, scale, symmetric, index / mask positives, doc ids), fp32 and bf16,
    B = 21, D = 19 (padded to 32 inside), several tiles each way: values and all gradients."""
    q64, d64, w, scale, kw = _triton_case(case, B=21, D=19)
    ours = _loss_and_grads("triton", q64, d64, w, dtype, scale, kw)
    _check_vs_float64(ours, q64, d64, w, dtype, scale, kw)


ODD_SHAPES = [
    pytest.param(1, 1, 1, id="B1-M1-D1"),
    pytest.param(3, 5, 7, id="B3-M5-D7"),
    pytest.param(17, 33, 16, id="B17-M33-D16"),
    pytest.param(40, 100, 48, id="B40-M100-D48"),
]


@pytest.mark.parametrize("B,M,D", ODD_SHAPES)
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("mode", ["index_ids", "mask_ids"])
def test_triton_odd_shapes(tk, B, M, D, dtype, mode, nan_empty):
    """Shapes that are not multiples of the 16-wide interpreter tiles (and a single row /
    column), in both positive modes with doc ids (index mode also symmetric)."""
    q64, d64, pos, ids, w = make_contrastive(
        B, M, D, positives="index" if mode == "index_ids" else "mask", doc_ids=True
    )
    kw = dict(positives=pos, doc_ids=ids, symmetric=mode == "index_ids")
    ours = _loss_and_grads("triton", q64, d64, w, dtype, 7.0, kw)
    _check_vs_float64(ours, q64, d64, w, dtype, 7.0, kw)


CHUNK_CASES = ["cos_hardneg_ids", "dot_index", "symmetric_ids_dupindex", "multi_pos_ids"]


@pytest.mark.parametrize("case", CHUNK_CASES)
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
def test_triton_chunks_and_splits_equal_one_pass(tk, case, dtype, monkeypatch, nan_empty):
    """Backward in 32-column chunks (tiny budget) and the forward in three candidate splits
    give the one-chunk / one-split results (to rounding) and stay within the tolerance rule."""
    q64, d64, w, scale, kw = _triton_case(case, B=21, D=19)
    one = _loss_and_grads("triton", q64, d64, w, dtype, scale, kw)
    M = d64.shape[0]
    assert tk.chunk_columns(21, M, 4) == M  # the default budget: one chunk here
    # 32-column chunks: two interpreter tiles each, the last chunk holds M % 32 columns
    elsize = torch.finfo(dtype).bits // 8
    monkeypatch.setattr(tk, "BWD_BUDGET_FRACTION", 0.0)
    monkeypatch.setattr(tk, "BWD_MIN_BUDGET_BYTES", 21 * 32 * elsize)
    monkeypatch.setattr(tk, "FWD_SPLITS", 3)
    assert tk.chunk_columns(21, M, elsize) == 32 < M
    many = _loss_and_grads("triton", q64, d64, w, dtype, scale, kw)
    _check_vs_float64(many, q64, d64, w, dtype, scale, kw, label="chunked ")
    # fp32: the split merge and the chunked sums round differently; bf16 gradients come back
    # in bf16, so a last-bit difference before that rounding moves them by one bf16 step.
    rtol = 1e-5 if dtype == torch.float32 else 2**-7
    for name, a, b in zip(["loss", "dq", "dd", "dscale"], many, one, strict=True):
        assert_close(a, b, rtol=rtol, atol=1e-7, name=f"chunked vs one pass: {name}")


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("case", ["multi_pos_ids", "symmetric_ids_dupindex"])
def test_triton_backward_is_deterministic(tiny_chunks, case, dtype):
    """Two runs (several chunks and splits, learnable scale) are bitwise equal."""
    q64, d64, w, scale, kw = _triton_case(case, B=21, D=19)
    first = _loss_and_grads("triton", q64, d64, w, dtype, scale, kw)
    second = _loss_and_grads("triton", q64, d64, w, dtype, scale, kw)
    for name, a, b in zip(["loss", "dq", "dd", "dscale"], first, second, strict=True):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


@pytest.mark.parametrize("needs", ["q", "d", "scale", "q_scale"])
def test_triton_partial_gradients_equal_full(tiny_chunks, needs):
    """Asking for a subset of (queries, docs, scale) gives the same numbers as all three."""
    q64, d64, w, scale, kw = _triton_case("multi_pos_ids", B=21, D=19)
    full = _loss_and_grads("triton", q64, d64, w, torch.float32, scale, kw)
    q = q64.float().requires_grad_("q" in needs)
    d = d64.float().requires_grad_(needs == "d")
    s = torch.tensor(scale, requires_grad="scale" in needs)
    loss = contrastive_loss(q, d, scale=s, reduction="none", impl="triton", **kw)
    want = [
        t
        for t, on in zip(
            [q, d, s], [q.requires_grad, d.requires_grad, s.requires_grad], strict=True
        )
        if on
    ]
    grads = iter(torch.autograd.grad((loss * w.float()).sum(), want))
    for name, t, f in zip(["dq", "dd", "dscale"], [q, d, s], full[1:], strict=True):
        if t.requires_grad:
            assert torch.equal(next(grads).double(), f), name


@pytest.mark.parametrize("where", ["query", "doc"])
@pytest.mark.parametrize("mode", ["index", "mask", "symmetric"])
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
def test_triton_nan_inputs_propagate(tiny_chunks, where, mode, dtype):
    """A NaN in an active embedding reaches the losses and gradients the reference's do
    (through the split merge and every chunk), never dropped by a max or a guard."""
    B, M, D = 21, 37, 19
    q64, d64, pos, _, w = make_contrastive(B, M, D, positives="mask" if mode == "mask" else None)
    (q64 if where == "query" else d64)[4, 3] = float("nan")
    kw = dict(positives=pos, symmetric=mode == "symmetric")
    ours = _loss_and_grads("triton", q64, d64, w, dtype, 20.0, kw)
    ref = _loss_and_grads("reference", q64, d64, w, torch.float64, 20.0, kw)
    assert torch.isnan(ours[0]).any()
    for name, a, b in zip(["loss", "dq", "dd", "dscale"], ours, ref, strict=True):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{name}: NaN pattern differs"


def _after(x: torch.Tensor, pad_rows: int, fill) -> torch.Tensor:
    """``x`` copied into the first rows of a larger buffer whose remaining rows hold ``fill``:
    a contiguous view, so a kernel reading past its last row reads ``fill``."""
    buf = torch.full((x.shape[0] + pad_rows, *x.shape[1:]), fill, dtype=x.dtype)
    buf[: x.shape[0]] = x
    return buf[: x.shape[0]]


@pytest.mark.parametrize("D", [32, 19], ids=["D32-in-place", "D19-padded"])
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("mode", ["index_ids", "mask_ids"])
def test_triton_never_reads_past_the_inputs(tiny_chunks, D, dtype, mode, nan_empty):
    """NaN rows right after queries and docs, True after the positives mask and id table,
    out-of-range ids after the positives / doc ids: the kernel module's outputs are bitwise
    those of clean inputs (the tile padding is masked, never read), and finite."""
    tk = tiny_chunks
    from rag_kernels.ops.contrastive.reference import positive_id_table

    B, M = 21, 37
    q64, d64, pos, ids, w = make_contrastive(
        B, M, D, positives="index" if mode == "index_ids" else "mask", doc_ids=True
    )
    q, d = F.normalize(q64, dim=-1).to(dtype), F.normalize(d64, dim=-1).to(dtype)
    scale = torch.tensor(20.0)
    pos_index, pos_mask = _positive_args(pos, B)
    table = None
    if pos_mask is not None:
        table, ids = positive_id_table(pos_mask, ids)
    grad = w.float()

    def run(q, d, pos_index, pos_mask, ids, table):
        loss, lse, plse = tk.forward(q, d, scale, pos_index, pos_mask, ids, table)
        grads = tk.backward(
            q, d, scale, pos_index, pos_mask, ids, table, lse, plse, grad, (True, True, True)
        )
        return [loss, lse, plse, *grads]

    clean = run(q, d, pos_index, pos_mask, ids, table)
    nan = float("nan")
    dirty = run(
        _after(q, 16, nan),
        _after(d, 16, nan),
        None if pos_index is None else _after(pos_index, 16, M + 5),
        None if pos_mask is None else _after(pos_mask, 16, True),
        _after(ids, 16, 10**6),
        None if table is None else _after(table, 16, True),
    )
    names = ["loss", "lse", "plse", "dq", "dd", "dscale"]
    for name, a, b in zip(names, dirty, clean, strict=True):
        assert torch.isfinite(a.float()).all(), name
        assert torch.equal(a, b), f"{name}: padding past the inputs changed the result"


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
def test_triton_out_of_range_positive_index_is_never_dereferenced(tiny_chunks, dtype):
    """With the value checks off nothing stops a positive index outside [0, M): in index
    mode with doc ids the kernels read that positive's id through it (an illegal address on
    a GPU). Such a row has no positive (loss inf), excludes nothing, and the other rows are
    those of a clean call, forward and backward."""
    tk = tiny_chunks
    B, M, D = 6, 37, 32
    q64, d64, pos, ids, w = make_contrastive(B, M, D, positives="index", doc_ids=True)
    q, d = F.normalize(q64, dim=-1).to(dtype), F.normalize(d64, dim=-1).to(dtype)
    scale = torch.tensor(20.0)
    clean = pos.long().clone()
    bad = clean.clone()
    bad[1], bad[4] = M + 10**6, -(10**6)
    ok = torch.ones(B, dtype=torch.bool)
    ok[[1, 4]] = False
    grad = (w.float() * ok).contiguous()

    def run(pos_index):
        loss, lse, plse = tk.forward(q, d, scale, pos_index, None, ids, None)
        dq, _, _ = tk.backward(
            q, d, scale, pos_index, None, ids, None, lse, plse, grad, (True, False, False)
        )
        return loss, lse, dq

    got, want = run(bad), run(clean)
    assert torch.isinf(got[0][~ok]).all() and (got[0][~ok] > 0).all()
    for name, a, b in zip(("loss", "lse", "dq"), got, want, strict=True):
        assert torch.equal(a[ok], b[ok]), f"{name}: rows with a valid positive changed"


def test_triton_launchers_take_strided_operands(tk):
    """The registered launchers (``torch.ops.rag_kernels.contrastive_*_triton``, callable
    directly) read row-major rows: a transposed view or a strided index gives the result of
    its contiguous copy, not of its storage order (the dq / dd GEMMs are ATen's, which take
    strides, and may round differently)."""
    B, M, D = 7, 19, 32
    q64, d64, pos, ids, w = make_contrastive(B, M, D, positives="index", doc_ids=True)
    q, d = F.normalize(q64, dim=-1).float(), F.normalize(d64, dim=-1).float()
    scale = torch.tensor(20.0)
    q_t = q.t().contiguous().t()  # same values, column-major
    d_t = d.t().contiguous().t()
    pos2 = torch.stack([pos.long(), pos.long()], 1)[:, 0]  # stride 2
    ids2 = torch.stack([ids, ids], 1)[:, 0]
    want = tk.forward(q, d, scale, pos.long(), None, ids, None)
    got = tk.forward(q_t, d_t, scale, pos2, None, ids2, None)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    g = w.float()
    want_g = tk.backward(q, d, scale, pos.long(), None, ids, None, *want[1:], g, (True, True, True))
    got_g = tk.backward(q_t, d_t, scale, pos2, None, ids2, None, *want[1:], g, (True, True, True))
    for name, a, b in zip(("dq", "dd", "dscale"), got_g, want_g, strict=True):
        assert_close(a, b, rtol=1e-6, atol=1e-6, name=name)  # ATen's GEMMs: strided operands


def test_chunk_columns_budget(tk):
    """The backward buffer [B, Mc] holds at most max(1 % of B x M, 256 MiB) and as many
    columns as fit, in multiples of the alignment (128 on CUDA, 16 in the interpreter) with a
    floor of one multiple, never more columns than M."""
    mib = 2**20
    align = tk._ALIGN
    for B, M, elsize in [(65536, 65536, 2), (65536, 65536, 4), (512, 10**7, 4), (4096, 4096, 4)]:
        mc = tk.chunk_columns(B, M, elsize)
        budget = max(0.01 * B * M * elsize, 256 * mib)
        assert mc <= M and (mc == M or mc % align == 0)
        assert B * mc * elsize <= budget
        assert mc == M or B * (mc + align) * elsize > budget  # as many columns as fit
    assert tk.chunk_columns(4096, 4096, 4) == 4096  # 64 MiB: one chunk
    assert tk.chunk_columns(2**22, 1000, 4) == align  # over budget only by the floor


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
    # a 0-d tensor scale was taken whatever it held (NaN / inf gave a NaN loss)
    **{
        f"scale_tensor_{v}": (dict(scale=torch.tensor(v)), ValueError, r"^scale must be positive")
        for v in (-1.0, 0.0, float("nan"), float("inf"))
    },
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
