"""Fused RAG-Token smoothing kernels (C++ and Triton) against the materialising reference.

The kernels are called through ``token_smoothing_core(..., impl)`` (no validation, the
``TokenSmoothingFunction`` autograd shell). C++: float64 exactness, gradcheck, fp32 / bf16
error bounds against a float64 truth. Triton (TRITON_INTERPRET=1, set by conftest): fp32
against the float64 truth at tiny shapes, and one bf16 case.
"""

from __future__ import annotations

import pytest
import torch

from rag_kernels.ops import registry
from rag_kernels.ops.token_smoothing import TokenSmoothingOptions, token_smoothing_core
from rag_kernels.ops.token_smoothing import cpu as ts_cpu
from rag_kernels.ops.token_smoothing.reference import token_smoothing_reference
from toolkit import assert_close, make_token_smoothing, needs_impl, poisoned

needs_cpu = needs_impl("token_smoothing", "cpu")
needs_triton = needs_impl("token_smoothing", "triton")
ts_triton = (
    None
    if registry.unavailable_reason("token_smoothing", "triton")
    else registry.kernels("token_smoothing", "triton")
)


def run_with_grads(fn, hidden, weight, scores, bias, upstream):
    leaves = [hidden, weight, scores] + ([bias] if bias is not None else [])
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    out = fn(*leaves[:3], leaves[3] if bias is not None else None)
    out.backward(upstream)
    return out.detach(), [x.grad for x in leaves]


def reference_fn(softcap, doc_mask):
    def f(h, w, s, b):
        return token_smoothing_reference(h, w, s, b, softcap, doc_mask)

    return f


def kernel_fn(impl, softcap, doc_mask):
    """The fused kernels of ``impl`` ("cpu" / "triton") on ``(h, w, s, b)``: ``out [B, T]``."""
    opts = TokenSmoothingOptions(softcap=softcap)

    def f(h, w, s, b):
        return token_smoothing_core(h, w, s, None, b, doc_mask, opts, impl)[0]

    return f


def kernel_with_logprob(impl):
    """``(out, lp)`` of ``impl`` from one vocabulary pass; target < 0 = ignored."""

    def f(h, w, s, target, b, doc_mask, opts):
        return token_smoothing_core(h, w, s, target, b, doc_mask, opts, impl)

    return f


@pytest.fixture
def cpu_tiles(request):
    rows, vocab = request.param
    old = ts_cpu.TILES
    ts_cpu.TILES = (rows, vocab, rows, vocab)
    yield request.param
    ts_cpu.TILES = old


# default tiles: forward one vocab tile covering V (single-pass mode), backward one tile; (4, 8):
# two-pass forward, several groups per query (rows/tokens split across GEMMs) and 5 vocab tiles
# with a ragged last one; (7, 16): groups of 2 tokens plus a ragged one.
TILES = [(0, 0), (4, 8), (7, 16)]
TILE_IDS = ["default-onepass", "rows4-vocab8", "rows7-vocab16"]


# ------------------------------------------------------------------------------------ C++


@needs_cpu
@pytest.mark.parametrize("cpu_tiles", TILES, ids=TILE_IDS, indirect=True)
@pytest.mark.parametrize(
    "bias,softcap,mask",
    [(False, None, False), (True, None, False), (False, 3.0, True), (True, 2.5, True)],
    ids=["plain", "bias", "softcap-mask", "bias-softcap-mask"],
)
def test_cpu_float64_matches_reference(cpu_tiles, bias, softcap, mask):
    B, K, T, H, V = 2, 3, 5, 7, 37
    hidden, weight, scores, b, doc_mask = make_token_smoothing(
        B, K, T, H, V, bias=bias, doc_mask=mask, hscale=2.0
    )
    upstream = torch.rand(B, T, dtype=torch.float64) * 2 - 0.5
    ref_out, ref_grads = run_with_grads(
        reference_fn(softcap, doc_mask), hidden, weight, scores, b, upstream
    )
    h_in, s_in = hidden, scores
    if mask:
        h_in = poisoned(hidden, ~doc_mask)
        s_in = scores.masked_fill(~doc_mask, float("nan"))
    out, grads = run_with_grads(
        kernel_fn("cpu", softcap, doc_mask), h_in, weight, s_in, b, upstream
    )
    assert out.dtype == torch.float64 and out.shape == (B, T)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-9)
    for name, g, rg in zip(
        ["hidden", "weight", "doc_scores", "bias"], grads, ref_grads, strict=False
    ):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-10, msg=name)
    if mask:
        assert (grads[0][~doc_mask] == 0).all()
        assert (grads[2][~doc_mask] == 0).all()


@needs_cpu
@pytest.mark.parametrize(
    "cpu_tiles", [(0, 0), (3, 2)], ids=["onepass", "rows3-vocab2"], indirect=True
)
@pytest.mark.parametrize("softcap", [None, 1.5], ids=["nocap", "softcap"])
def test_cpu_gradcheck(cpu_tiles, softcap):
    hidden, weight, scores, b, doc_mask = make_token_smoothing(
        2, 3, 2, 3, 5, bias=True, doc_mask=True
    )
    opts = TokenSmoothingOptions(softcap=softcap)
    inputs = [x.requires_grad_(True) for x in (hidden, weight, scores, b)]

    def f(h, w, s, bb):
        return token_smoothing_core(h, w, s, None, bb, doc_mask, opts, "cpu")[0]

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@needs_cpu
@pytest.mark.parametrize(
    "cpu_tiles", [(0, 0), (4, 8)], ids=["onepass", "rows4-vocab8"], indirect=True
)
def test_cpu_zero_upstream_tokens_are_skipped(cpu_tiles):
    """Tokens with g = 0 (ignored) contribute no gradient, whatever their hidden rows hold."""
    B, K, T, H, V = 2, 3, 6, 5, 23
    hidden, weight, scores, b, _ = make_token_smoothing(B, K, T, H, V, bias=True)
    upstream = torch.rand(B, T, dtype=torch.float64) + 0.1
    upstream[0, 1] = 0.0
    upstream[1, 4:] = 0.0
    ignored = upstream == 0
    _, ref_grads = run_with_grads(reference_fn(None, None), hidden, weight, scores, b, upstream)
    h_poison = hidden.clone()
    h_poison.permute(0, 2, 1, 3)[ignored] = float("nan")
    out, grads = run_with_grads(kernel_fn("cpu", None, None), h_poison, weight, scores, b, upstream)
    assert torch.isnan(out[ignored]).all() and torch.isfinite(out[~ignored]).all()
    for name, g, rg in zip(
        ["hidden", "weight", "doc_scores", "bias"], grads, ref_grads, strict=False
    ):
        if name == "doc_scores":
            continue  # the NaN forward rows reach wsum, hence only the ignored tokens' terms
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-10, msg=name)
    assert (grads[0].permute(0, 2, 1, 3)[ignored] == 0).all()


@needs_cpu
@pytest.mark.parametrize("cpu_tiles", TILES, ids=TILE_IDS, indirect=True)
def test_cpu_forward_skips_tokens_without_target(cpu_tiles):
    """With a target, the forward never computes (nor reads) the rows of tokens whose id is
    negative (padding): out, lse, wsum and lp are 0 there; the other tokens are unchanged (up to the
    GEMM blocking of a different row grouping)."""
    B, K, T, H, V = 2, 3, 6, 5, 23
    hidden, weight, scores, b, _ = make_token_smoothing(B, K, T, H, V, bias=True)
    target = torch.randint(0, V, (B, T))
    target[0, 1] = -1
    target[1, 3:] = -100
    ignored = target < 0
    log_prior = torch.log_softmax(scores.detach(), -1)
    opts = TokenSmoothingOptions()
    h_poison = hidden.detach().clone()
    h_poison.permute(0, 2, 1, 3)[ignored] = float("nan")
    out, lse, wsum, lp = ts_cpu.forward(h_poison, weight, log_prior, b, target, opts)
    ref_out, ref_lse, ref_wsum, _ = ts_cpu.forward(
        hidden.detach(), weight, log_prior, b, None, opts
    )
    assert (out[ignored] == 0).all()
    for x in (lse, wsum, lp):
        assert (x.permute(0, 2, 1)[ignored] == 0).all()
    torch.testing.assert_close(out[~ignored], ref_out[~ignored], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        lse.permute(0, 2, 1)[~ignored], ref_lse.permute(0, 2, 1)[~ignored], rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(
        wsum.permute(0, 2, 1)[~ignored], ref_wsum.permute(0, 2, 1)[~ignored], rtol=1e-12, atol=1e-12
    )


@needs_cpu
def test_cpu_fp32_error_within_twice_pytorch():
    B, K, T, H, V = 2, 4, 9, 33, 301
    hidden, weight, scores, b, doc_mask = make_token_smoothing(
        B, K, T, H, V, bias=True, doc_mask=True, hscale=3.0
    )
    upstream = torch.rand(B, T, dtype=torch.float64)
    softcap = 6.0
    truth, truth_g = run_with_grads(
        reference_fn(softcap, doc_mask), hidden, weight, scores, b, upstream
    )
    args32 = [x.float() for x in (hidden, weight, scores, b)]
    torch_out, torch_g = run_with_grads(reference_fn(softcap, doc_mask), *args32, upstream.float())
    old = ts_cpu.TILES
    try:
        for tiles in [(0, 0, 0, 0), (8, 64, 8, 64)]:
            ts_cpu.TILES = tiles
            out, g = run_with_grads(kernel_fn("cpu", softcap, doc_mask), *args32, upstream.float())
            assert out.dtype == torch.float32
            for name, x, tx, rx in zip(
                ["out", "hidden", "weight", "doc_scores", "bias"],
                [out, *g],
                [torch_out, *torch_g],
                [truth, *truth_g],
                strict=False,
            ):
                assert_close(x, rx, ref=tx, rtol=2e-6, atol=1e-6, name=f"{name} tiles={tiles}")
    finally:
        ts_cpu.TILES = old


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cpu_low_precision_error_within_twice_pytorch(dtype):
    B, K, T, H, V = 2, 3, 7, 24, 157
    hidden, weight, scores, b, doc_mask = make_token_smoothing(
        B, K, T, H, V, bias=True, doc_mask=True
    )
    upstream = torch.rand(B, T, dtype=torch.float64)
    hl, wl, bl = (x.to(dtype) for x in (hidden, weight, b))
    scores = scores.float()
    # Truth: float64 on the same (rounded) inputs.
    truth, truth_g = run_with_grads(
        reference_fn(None, doc_mask),
        hl.double(),
        wl.double(),
        scores.double(),
        bl.double(),
        upstream,
    )
    torch_out, torch_g = run_with_grads(
        reference_fn(None, doc_mask), hl, wl, scores, bl, upstream.float()
    )
    out, g = run_with_grads(kernel_fn("cpu", None, doc_mask), hl, wl, scores, bl, upstream.float())
    assert out.dtype == torch.float32 and g[0].dtype == dtype and g[1].dtype == dtype
    for name, x, tx, rx in zip(
        ["out", "hidden", "weight", "doc_scores", "bias"],
        [out, *g],
        [torch_out, *torch_g],
        [truth, *truth_g],
        strict=False,
    ):
        assert_close(x, rx, ref=tx, rtol=1e-5, atol=1e-5, name=name)


@needs_cpu
def test_cpu_partial_needs_and_outputs():
    """Only some inputs require grad; the op returns fp32 lse / wsum consistent with the math."""
    B, K, T, H, V = 1, 3, 4, 5, 11
    hidden, weight, scores, b, _ = make_token_smoothing(B, K, T, H, V, bias=True)
    scores.requires_grad_(True)
    opts = TokenSmoothingOptions()
    out = token_smoothing_core(hidden, weight, scores, None, b, None, opts, "cpu")[0]
    out.sum().backward()
    ref = token_smoothing_reference(hidden, weight, scores.detach().clone().requires_grad_(True), b)
    s2 = scores.detach().clone().requires_grad_(True)
    token_smoothing_reference(hidden, weight, s2, b).sum().backward()
    torch.testing.assert_close(out.detach(), ref)
    torch.testing.assert_close(scores.grad, s2.grad)
    log_prior = torch.log_softmax(scores.detach(), -1)
    o, lse, wsum, lp = ts_cpu.forward(hidden, weight, log_prior, b, None, opts)
    assert lp.numel() == 0
    z = hidden @ weight.t() + b
    torch.testing.assert_close(lse, torch.logsumexp(z, -1))
    torch.testing.assert_close(wsum.sum(1), torch.full((B, T), float(V), dtype=torch.float64))


def logprob_reference(hidden, weight, target, bias, softcap, doc_mask):
    """``[B,K,T]`` log softmax(z)[target] (0 where target < 0 or the document is masked)."""
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    z = z.double() if z.dtype == torch.float64 else z.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z, dim=-1)
    keep = target >= 0
    y = torch.where(keep, target, 0)[:, None, :, None].expand(*logp.shape[:3], 1)
    lp = logp.gather(-1, y)[..., 0]
    mask = keep[:, None, :].expand_as(lp)
    if doc_mask is not None:
        mask = mask & doc_mask[:, :, None]
    return torch.where(mask, lp, torch.zeros((), dtype=lp.dtype))


def check_with_logprob(fn, dtype, softcap, *, rtol, atol):
    """One call gives (out, lp); a weighted sum of both backpropagates like the reference."""
    B, K, T, H, V = 2, 3, 5, 7, 37
    hidden, weight, scores, b, doc_mask = make_token_smoothing(
        B, K, T, H, V, bias=True, doc_mask=True, hscale=2.0
    )
    target = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    target[0, 2] = -100
    target[1, 4] = -1
    c_out = torch.rand(B, T, dtype=torch.float64)
    c_out[1, 1] = 0.0  # this token only gets gradient through lp
    c_lp = torch.rand(B, K, T, dtype=torch.float64)
    c_lp[0, :, 3] = 0.0  # this one only through out

    def ref(h, w, s, bb):
        h_clean = torch.where(doc_mask[:, :, None, None], h, torch.zeros((), dtype=h.dtype))
        out = token_smoothing_reference(h, w, s, bb, softcap, doc_mask)
        out = torch.where(target >= 0, out, 0.0)  # with a target: 0 at ignored positions
        lp = logprob_reference(h_clean, w, target, bb, softcap, doc_mask)
        return out, lp

    leaves = [x.detach().clone().requires_grad_(True) for x in (hidden, weight, scores, b)]
    r_out, r_lp = ref(*leaves)
    ((r_out * c_out).sum() + (r_lp * c_lp).sum()).backward()
    r_grads = [x.grad for x in leaves]

    h_in = poisoned(hidden, ~doc_mask).to(dtype)
    kleaves = [
        x.detach().clone().requires_grad_(True)
        for x in (
            h_in,
            weight.to(dtype),
            scores.to(torch.float32 if dtype != torch.float64 else dtype),
            b.to(dtype),
        )
    ]
    out, lp = fn(
        kleaves[0],
        kleaves[1],
        kleaves[2],
        target,
        kleaves[3],
        doc_mask,
        TokenSmoothingOptions(softcap=softcap),
    )
    assert lp.shape == (B, K, T)
    ((out * c_out.to(out.dtype)).sum() + (lp * c_lp.to(lp.dtype)).sum()).backward()
    torch.testing.assert_close(out.double(), r_out.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(lp.double(), r_lp.detach(), rtol=rtol, atol=atol)
    for name, x, rx in zip(
        ["hidden", "weight", "doc_scores", "bias"], kleaves, r_grads, strict=False
    ):
        assert torch.isfinite(x.grad).all(), name
        torch.testing.assert_close(x.grad.double(), rx, rtol=rtol, atol=atol, msg=name)


@needs_cpu
@pytest.mark.parametrize("cpu_tiles", TILES, ids=TILE_IDS, indirect=True)
@pytest.mark.parametrize("softcap", [None, 2.5], ids=["nocap", "softcap"])
def test_cpu_with_logprob_matches_reference(cpu_tiles, softcap):
    check_with_logprob(kernel_with_logprob("cpu"), torch.float64, softcap, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------- Triton


VARIANTS = ["deterministic", "atomic"]


@pytest.fixture
def variant(request, monkeypatch):
    """Each Triton backward variant (through the environment variable), with the
    deterministic backward's dz chunk buffer NaN-filled (an unwritten element shows)."""
    from rag_kernels.ops import triton_utils as tu

    monkeypatch.setenv(tu.BACKWARD_ENV, request.param)
    monkeypatch.setattr(
        ts_triton,
        "_empty_dz",
        lambda shape, device, dtype: torch.full(shape, float("nan"), dtype=dtype, device=device),
    )
    return request.param


def triton_variants(fn):
    return pytest.mark.parametrize("variant", VARIANTS, indirect=True)(fn)


@pytest.fixture
def triton_blocks(request):
    rows, bv, bh = request.param
    old = ts_triton.ROWS, ts_triton.BLOCK_V, ts_triton.BLOCK_H
    ts_triton.ROWS, ts_triton.BLOCK_V, ts_triton.BLOCK_H = rows, bv, bh
    yield request.param
    ts_triton.ROWS, ts_triton.BLOCK_V, ts_triton.BLOCK_H = old


@needs_triton
@pytest.mark.parametrize(
    "triton_blocks", [(16, 16, 16), (8, 8, 4)], ids=["rows16-v16-h16", "rows8-v8-h4"], indirect=True
)
@pytest.mark.parametrize(
    "bias,softcap,mask",
    [(False, None, False), (True, 2.5, True)],
    ids=["plain", "bias-softcap-mask"],
)
@triton_variants
def test_triton_fp32_matches_float64_truth(triton_blocks, bias, softcap, mask, variant):
    B, K, T, H, V = 2, 3, 5, 7, 37
    hidden, weight, scores, b, doc_mask = make_token_smoothing(
        B, K, T, H, V, bias=bias, doc_mask=mask, hscale=2.0
    )
    upstream = torch.rand(B, T, dtype=torch.float64) * 2 - 0.5
    upstream[1, 2] = 0.0
    truth, truth_g = run_with_grads(
        reference_fn(softcap, doc_mask), hidden, weight, scores, b, upstream
    )
    args32 = [None if x is None else x.float() for x in (hidden, weight, scores, b)]
    torch_out, torch_g = run_with_grads(reference_fn(softcap, doc_mask), *args32, upstream.float())
    h_in, s_in = args32[0], args32[2]
    if mask:
        h_in = poisoned(h_in, ~doc_mask)
        s_in = s_in.masked_fill(~doc_mask, float("nan"))
    out, g = run_with_grads(
        kernel_fn("triton", softcap, doc_mask),
        h_in,
        args32[1],
        s_in,
        args32[3],
        upstream.float(),
    )
    assert out.dtype == torch.float32 and out.shape == (B, T)
    for name, x, tx, rx in zip(
        ["out", "hidden", "weight", "doc_scores", "bias"],
        [out, *g],
        [torch_out, *torch_g],
        [truth, *truth_g],
        strict=False,
    ):
        assert torch.isfinite(x).all(), name
        assert_close(x, rx, ref=tx, rtol=2e-6, atol=1e-6, name=name)
    if mask:
        assert (g[0][~doc_mask] == 0).all()


@needs_triton
@triton_variants
def test_triton_vocab_splits_and_bf16(variant):
    """Several vocab splits merged on the host; bf16 within twice plain PyTorch's error."""
    B, K, T, H, V = 1, 2, 3, 16, 45
    hidden, weight, scores, b, _ = make_token_smoothing(B, K, T, H, V, bias=True)
    opts = TokenSmoothingOptions()
    lp = torch.log_softmax(scores.float(), -1)
    ref = token_smoothing_reference(hidden, weight, scores, b)
    for splits in (1, 3):
        out, lse, wsum, _ = ts_triton.forward(
            hidden.float(), weight.float(), lp, b.float(), None, opts, num_splits=splits
        )
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(
            wsum.sum(1).double(),
            torch.full((B, T), float(V), dtype=torch.float64),
            rtol=1e-5,
            atol=1e-4,
        )
    upstream = torch.rand(B, T, dtype=torch.float64)
    hl, wl, bl = (x.bfloat16() for x in (hidden, weight, b))
    truth, truth_g = run_with_grads(
        reference_fn(None, None), hl.double(), wl.double(), scores, bl.double(), upstream
    )
    torch_out, torch_g = run_with_grads(
        reference_fn(None, None), hl, wl, scores.float(), bl, upstream.float()
    )
    out, g = run_with_grads(
        kernel_fn("triton", None, None),
        hl,
        wl,
        scores.float(),
        bl,
        upstream.float(),
    )
    for name, x, tx, rx in zip(
        ["out", "hidden", "weight", "doc_scores", "bias"],
        [out, *g],
        [torch_out, *torch_g],
        [truth, *truth_g],
        strict=False,
    ):
        assert_close(x, rx, ref=tx, rtol=1e-5, atol=1e-5, name=name)


@needs_triton
def test_triton_vocab_splits_merge_all_minus_inf_rows_as_one_split():
    """A -inf bias over the whole vocabulary (every split's partial max -inf): the merged
    per-document log-sum-exp is -inf with 3 splits as with 1 (the host merge gave NaN)."""
    B, K, T, H, V = 1, 2, 3, 16, 45
    hidden, weight, scores, b, _ = make_token_smoothing(B, K, T, H, V, bias=True)
    b = torch.full_like(b, float("-inf"))
    lp = torch.log_softmax(scores.float(), -1)
    for splits in (1, 3):
        _, lse, _, _ = ts_triton.forward(
            hidden.float(),
            weight.float(),
            lp,
            b.float(),
            None,
            TokenSmoothingOptions(),
            num_splits=splits,
        )
        assert (lse == float("-inf")).all(), (splits, lse)


@needs_triton
@triton_variants
def test_triton_bf16_softcap_mask_multi_chunk_within_twice_pytorch(variant, monkeypatch):
    """bf16 with bias, softcap, masked (NaN-poisoned) documents and three vocab chunks."""
    monkeypatch.setattr(ts_triton, "CHUNK_COLUMNS", 16)
    B, K, T, H, V = 2, 3, 5, 16, 37
    hidden, weight, scores, b, doc_mask = make_token_smoothing(
        B, K, T, H, V, bias=True, doc_mask=True, hscale=2.0
    )
    upstream = torch.rand(B, T, dtype=torch.float64)
    hl, wl, bl = (x.bfloat16() for x in (hidden, weight, b))
    scores = scores.float()
    truth, truth_g = run_with_grads(
        reference_fn(2.5, doc_mask), hl.double(), wl.double(), scores.double(), bl.double(),
        upstream,
    )  # fmt: skip
    torch_out, torch_g = run_with_grads(
        reference_fn(2.5, doc_mask), hl, wl, scores, bl, upstream.float()
    )
    out, g = run_with_grads(
        kernel_fn("triton", 2.5, doc_mask), poisoned(hl, ~doc_mask), wl, scores, bl,
        upstream.float(),
    )  # fmt: skip
    assert g[0].dtype == torch.bfloat16 and (g[0][~doc_mask] == 0).all()
    for name, x, tx, rx in zip(
        ["out", "hidden", "weight", "doc_scores", "bias"],
        [out, *g],
        [torch_out, *torch_g],
        [truth, *truth_g],
        strict=True,
    ):
        assert_close(x, rx, ref=tx, rtol=1e-5, atol=1e-5, name=name)


@needs_triton
def test_triton_refuses_more_documents_than_its_tiles_take():
    """Past MAX_DOCS documents a token's rows no longer fit one program's tile on the GPU (the
    launch failed with OutOfResources): a ValueError naming hidden's K, before any launch."""
    from rag_kernels.ops import token_smoothing as ts

    K = ts_triton.MAX_DOCS + 1
    hidden, weight, scores, _, _ = make_token_smoothing(1, K, 1, 16, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match=rf"hidden has K={K} documents.*impl='reference'"):
        ts.token_smoothing(hidden, weight, scores, impl="triton")
    hidden, weight, scores, _, _ = make_token_smoothing(1, K - 1, 1, 16, 16, dtype=torch.float32)
    out = ts.token_smoothing(hidden, weight, scores, impl="triton")
    ref = ts.token_smoothing(hidden.double(), weight.double(), scores, impl="reference")
    assert_close(out.double(), ref, rtol=1e-5, atol=1e-5, name="K = MAX_DOCS")


@needs_triton
def test_triton_rejects_float64():
    hidden, weight, scores, _, _ = make_token_smoothing(1, 2, 2, 3, 5)
    with pytest.raises(TypeError, match="float64"):
        token_smoothing_core(
            hidden, weight, scores, None, None, None, TokenSmoothingOptions(), "triton"
        )


@needs_triton
@triton_variants
@pytest.mark.parametrize("softcap", [None, 2.5], ids=["nocap", "softcap"])
def test_triton_with_logprob_matches_reference(softcap, variant):
    check_with_logprob(kernel_with_logprob("triton"), torch.float32, softcap, rtol=1e-4, atol=1e-4)


def _triton_grads(hidden, weight, scores, b, target, doc_mask, c_out, c_lp, softcap=None):
    """Gradients (hidden, weight, doc_scores, bias) of ``sum c_out out + sum c_lp lp``."""
    leaves = [x.detach().clone().requires_grad_(True) for x in (hidden, weight, scores, b)]
    opts = TokenSmoothingOptions(softcap=softcap)
    out, lp = token_smoothing_core(*leaves[:3], target, leaves[3], doc_mask, opts, "triton")
    ((out * c_out).sum() + (lp * c_lp).sum()).backward()
    return [x.grad for x in leaves]


def _nan_rows_case(dtype):
    """Masked documents, an ignored target position and a zero-upstream token, all three
    with NaN hidden rows; returns the inputs and a float64 truth computed on clean rows."""
    B, K, T, H, V = 2, 3, 5, 7, 37
    hidden, weight, scores, b, doc_mask = make_token_smoothing(
        B, K, T, H, V, bias=True, doc_mask=True, hscale=2.0
    )
    target = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    target[0, 2] = -1
    c_out = torch.rand(B, T, dtype=torch.float64)
    c_out[0, 2] = c_out[1, 3] = 0.0  # token (0, 2) ignored; (1, 3) has zero upstream
    c_lp = torch.rand(B, K, T, dtype=torch.float64)
    c_lp[1, :, 3] = 0.0
    dead = ~doc_mask[:, :, None].expand(B, K, T).clone()
    dead[0, :, 2] = dead[1, :, 3] = True
    hidden = hidden.to(dtype)
    weight, b = weight.to(dtype), b.to(dtype)
    return hidden, weight, scores.float(), b, target, doc_mask, c_out, c_lp, dead


@needs_triton
@triton_variants
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_nan_rows_never_read(dtype, variant, monkeypatch):
    """NaN in masked documents', ignored and zero-upstream tokens' rows reaches no gradient,
    with one and several vocabulary chunks, and the result matches the clean-input run."""
    hidden, weight, scores, b, target, doc_mask, c_out, c_lp, dead = _nan_rows_case(dtype)
    args = (weight, scores, b, target, doc_mask, c_out.float(), c_lp.float())
    clean = _triton_grads(torch.where(dead[..., None], 0.0, hidden).to(dtype), *args)
    for cols in (None, 16):
        monkeypatch.setattr(ts_triton, "CHUNK_COLUMNS", cols)
        got = _triton_grads(poisoned(hidden, dead), *args)
        for name, x, c in zip(["hidden", "weight", "doc_scores", "bias"], got, clean, strict=True):
            assert torch.isfinite(x).all(), f"{name} chunk={cols}"
            torch.testing.assert_close(x, c, rtol=1e-5, atol=1e-5, msg=f"{name} chunk={cols}")
        assert (got[0][dead] == 0).all()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_chunked_backward_deterministic_and_matches_one_chunk(dtype, monkeypatch):
    """Two deterministic runs are bitwise equal; 16-column chunks (3 of V = 37, the last one
    ragged) give the one-chunk result up to fp32 summation order (bf16: one rounding)."""
    hidden, weight, scores, b, target, doc_mask, c_out, c_lp, _ = _nan_rows_case(dtype)
    args = (hidden, weight, scores, b, target, doc_mask, c_out.float(), c_lp.float())
    monkeypatch.setenv("RAG_KERNELS_TRITON_BACKWARD", "deterministic")
    one = _triton_grads(*args, softcap=2.5)
    again = _triton_grads(*args, softcap=2.5)
    for x, y in zip(one, again, strict=True):
        assert torch.equal(x, y)
    monkeypatch.setattr(ts_triton, "CHUNK_COLUMNS", 16)
    many = _triton_grads(*args, softcap=2.5)
    tol = 1e-6 if dtype == torch.float32 else 2**-7
    for name, x, y in zip(["hidden", "weight", "doc_scores", "bias"], many, one, strict=True):
        torch.testing.assert_close(x.float(), y.float(), rtol=tol, atol=tol, msg=name)


@needs_triton
def test_triton_backward_option_checked():
    with pytest.raises(ValueError, match="triton_backward"):
        TokenSmoothingOptions(triton_backward="fast")
    assert TokenSmoothingOptions(triton_backward="atomic").triton_backward == "atomic"
