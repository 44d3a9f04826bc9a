"""Triton linear_logprob kernels (run on CPU under TRITON_INTERPRET=1) vs the float64 reference.

Every test runs with the kernels' scratch buffers (fp32 partials, the backward's dz chunk)
NaN-filled, so an element a kernel forgot to write shows up as NaN. Backward tests run both
variants (``RAG_KERNELS_TRITON_BACKWARD``): the default deterministic one (dz chunks + ATen
GEMMs) and the atomic one. The offline sm_90 compile of every config is in
tests/test_triton_compile.py.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest does too)

from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import rag_kernels as rk  # noqa: E402
from rag_kernels.ops import registry  # noqa: E402
from toolkit import IGNORE as IGN  # noqa: E402
from toolkit import assert_close, make_linear_logprob, nan_scratch  # noqa: E402

_WHY = registry.unavailable_reason("linear_logprob", "triton")
if _WHY:
    pytest.skip(f"linear_logprob impl='triton': {_WHY}", allow_module_level=True)

from rag_kernels.ops import triton_utils as tu  # noqa: E402
from rag_kernels.ops.linear_logprob import make_options  # noqa: E402
from rag_kernels.ops.linear_logprob import triton as tk  # noqa: E402

VARIANTS = ["deterministic", "atomic"]


@pytest.fixture(autouse=True)
def _nan_scratch(monkeypatch):
    nan_scratch(monkeypatch, tk)
    monkeypatch.setattr(
        tk, "_empty_dz", lambda shape, device, dtype: torch.full(shape, float("nan"), dtype=dtype)
    )


@pytest.fixture(params=VARIANTS)
def variant(request, monkeypatch):
    """Run the test with each backward variant, selected through the environment variable."""
    monkeypatch.setenv(tu.BACKWARD_ENV, request.param)
    return request.param


def run(impl, h, w, y, b, ups, softcap=None, grads=(True, True, True), stats=True):
    """Forward + weighted backward through the public API; returns outputs and gradients."""
    h = h.detach().clone().requires_grad_(grads[0])
    w = w.detach().clone().requires_grad_(grads[1])
    b = None if b is None else b.detach().clone().requires_grad_(grads[2])
    out = rk.linear_logprob(h, w, y, bias=b, softcap=softcap, impl=impl, return_stats=True)
    used = tuple(out) if stats else out[:1]
    loss = sum((o * u.to(o.dtype)).sum() for o, u in zip(used, ups, strict=False))
    loss.backward()
    return tuple(out), (h.grad, w.grad, None if b is None else b.grad)


OPTIONS = {
    "plain": dict(bias=False, softcap=None),
    "bias": dict(bias=True, softcap=None),
    "softcap": dict(bias=False, softcap=2.0),
    "bias_softcap": dict(bias=True, softcap=2.0),
}
SHAPES = {"N37H50V131": (37, 50, 131), "N5H16V33": (5, 16, 33)}


def _check_against_reference(shape, opt, splits, monkeypatch):
    monkeypatch.setattr(tk, "_num_splits", lambda n, v, device: splits)
    h, w, y, b, ups = make_linear_logprob(
        *shape, bias=opt["bias"], n_ignore=min(4, shape[0] - 1), wscale=2.0
    )
    out_ref, g_ref = run("reference", h, w, y, b, ups, softcap=opt["softcap"])
    f = lambda t: None if t is None else t.float()
    out, grads = run("triton", f(h), f(w), y, f(b), ups, softcap=opt["softcap"])
    ign = y == IGN
    for name, o, r in zip(("lp", "lse", "sum_logprob"), out, out_ref, strict=False):
        assert o.dtype == torch.float32 and o.shape == y.shape
        assert (o[ign] == 0).all(), f"{name} not zero on ignored rows"
        assert_close(o, r, rtol=1e-5, name=name)
    for name, gr, gw in zip(("d_hidden", "d_weight", "d_bias"), grads, g_ref, strict=False):
        if gw is None:
            assert gr is None
            continue
        assert torch.isfinite(gr).all(), name
        assert_close(gr, gw, rtol=1e-5, name=name)
    assert (grads[0][ign] == 0).all()


@pytest.mark.parametrize("opt", list(OPTIONS), ids=list(OPTIONS))
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_fp32_matches_float64_reference(shape, opt, variant, monkeypatch):
    _check_against_reference(SHAPES[shape], OPTIONS[opt], 1, monkeypatch)


@pytest.mark.parametrize("opt", ["plain", "bias_softcap"])
def test_multi_chunk_backward_matches_reference(opt, monkeypatch):
    # 32-column chunks: 5 chunks of V = 131, the last one 3 columns (a ragged tile).
    monkeypatch.setattr(tk, "CHUNK_COLUMNS", 32)
    _check_against_reference((37, 50, 131), OPTIONS[opt], 1, monkeypatch)


@pytest.mark.parametrize("opt", ["plain", "bias_softcap"])
def test_vocab_splits_combine(opt, monkeypatch):
    # 3 splits of 64/64/3 columns: the partial-LSE merge and a split of a single partial tile.
    _check_against_reference((37, 50, 131), OPTIONS[opt], 3, monkeypatch)


def test_only_logprob_used_and_partial_needs(variant):
    h, w, y, b, ups = make_linear_logprob(
        23, 20, 70, bias=True, dtype=torch.float32, n_ignore=4, wscale=2.0
    )
    hd = h.double()
    for grads in [(True, False, False), (False, True, True), (False, False, True)]:
        _, g_ref = run("reference", hd, w.double(), y, b.double(), ups, grads=grads, stats=False)
        _, g = run("triton", h, w, y, b, ups, grads=grads, stats=False)
        for got, want, need in zip(g, g_ref, grads, strict=False):
            if need:
                assert_close(got, want, rtol=1e-5, name=f"grads={grads}")
            else:
                assert got is None


def test_zero_upstream_rows_skipped_exactly(variant):
    h, w, y, _, ups = make_linear_logprob(40, 12, 45, dtype=torch.float32, n_ignore=3, wscale=2.0)
    zero_rows = torch.zeros(40, dtype=torch.bool)
    zero_rows[5:30] = True  # active rows interleaved: the kernel reorders them
    ups = [torch.where(zero_rows, 0.0, u) for u in ups]
    _, g_ref = run("reference", h.double(), w.double(), y, None, ups)
    _, g = run("triton", h, w, y, None, ups)
    assert (g[0][zero_rows] == 0).all()
    assert_close(g[0], g_ref[0], rtol=1e-5, name="d_hidden")
    assert_close(g[1], g_ref[1], rtol=1e-5, name="d_weight")


def test_all_rows_ignored(variant):
    h, w, y, _, ups = make_linear_logprob(6, 8, 21, dtype=torch.float32, n_ignore=6, wscale=2.0)
    out, g = run("triton", h, w, y, None, ups)
    for o in out:
        assert (o == 0).all()
    assert (g[0] == 0).all() and (g[1] == 0).all()


def test_leading_dims_int32_target():
    h, w, y, _, ups = make_linear_logprob(12, 10, 19, dtype=torch.float32, n_ignore=2, wscale=2.0)
    flat = rk.linear_logprob(h, w, y, impl="triton")
    got = rk.linear_logprob(h.view(3, 4, 10), w, y.view(3, 4).int(), impl="triton")
    assert got.shape == (3, 4)
    torch.testing.assert_close(got.reshape(-1), flat, rtol=0, atol=0, equal_nan=False)


def test_float64_rejected_with_clear_error():
    h, w, y, _, _ = make_linear_logprob(4, 3, 5, n_ignore=0, wscale=2.0)
    with pytest.raises(TypeError, match="hidden.*float64"):
        rk.linear_logprob(h, w, y, impl="triton")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_within_twice_torch_error(dtype, variant):
    # Ground truth: float64 on the rounded inputs. Plain PyTorch: the reference run in `dtype`.
    h, w, y, b, ups = make_linear_logprob(
        37, 50, 131, dtype=dtype, bias=True, n_ignore=4, wscale=2.0
    )
    out64, g64 = run("reference", h.double(), w.double(), y, b.double(), ups, softcap=None)
    out_pt, g_pt = run("reference", h, w, y, b, ups)
    out_tk, g_tk = run("triton", h, w, y, b, ups)
    names = ("lp", "lse", "sum_logprob", "d_hidden", "d_weight", "d_bias")
    for name, got, pt, want in zip(names, out_tk + g_tk, out_pt + g_pt, out64 + g64, strict=False):
        assert got.dtype == pt.dtype, name
        assert_close(got, want, ref=pt, rtol=1e-4, name=name)


# ---------------------------------------------------------------------------- filter_eps


def _filter_case():
    # A large bias on the first 8 ids puts nearly all probability mass in vocab tile 0, so
    # tiles 1.. hold only p ~ 1e-5 entries; a few targets sit in tile 3 (ids 96..127).
    N, H, V = 37, 20, 131
    h, w, y, b, ups = make_linear_logprob(
        N, H, V, dtype=torch.float32, bias=True, wscale=1.0, n_ignore=4
    )
    b[:8] += 12.0
    keep = y != IGN
    y = torch.where(keep, y % 8, y)
    y[keep.nonzero()[:3, 0]] = 100
    return h, w, y, b, ups


def _bwd(h, w, y, b, ups, filter_eps, with_sum=False, variant=None):
    opts = SimpleNamespace(
        ignore_index=IGN, softcap=None, filter_eps=filter_eps, triton_backward=variant
    )
    _, lse, _ = tk.forward(h, w, y, b, opts)
    g = [u.float() for u in ups]
    return tk.backward(
        h, w, y, b, lse, g[0], g[1], g[2] if with_sum else None, opts, (True, True, True)
    )


@pytest.mark.parametrize("which", VARIANTS)
def test_filter_eps_error_within_documented_bound(which):
    h, w, y, b, ups = _filter_case()
    eps = 1e-3
    exact = _bwd(h, w, y, b, ups, None, variant=which)
    filt = _bwd(h, w, y, b, ups, eps, variant=which)
    # The filter did skip something: whole tiles of dW are exactly zero.
    assert (filt[1][32:96] == 0).all() and (exact[1][32:96] != 0).any()
    keep = (y != IGN).double()
    gabs = (ups[0].abs() + ups[1].abs()) * keep  # |g_r| + |g^lse_r| on active rows
    hz = torch.where(keep.bool()[:, None], h.double(), 0.0)
    # |dh_r err| <= eps (|g_r|+|g^lse_r|) sum_v |W_v|; |dW_v err| <= eps sum_r (..)|h_r|; db alike.
    bound_dh = eps * gabs[:, None] * w.double().abs().sum(0)[None, :]
    bound_dw = eps * (gabs[:, None] * hz.abs()).sum(0)[None, :].expand(w.shape[0], -1)
    bound_db = eps * gabs.sum() * torch.ones(w.shape[0], dtype=torch.float64)
    for name, f, e, bound in zip(
        ("dh", "dW", "db"), filt, exact, (bound_dh, bound_dw, bound_db), strict=False
    ):
        err = (f.double() - e.double()).abs()
        assert (err <= bound + 1e-6).all(), (
            f"{name}: {(err - bound).max().item():.3g} over the bound"
        )
    # Rows whose target sits in tile 3 keep their exact one-hot gradient there.
    assert_close(filt[1][96:128], exact[1][96:128].double(), rtol=1e-2, name="target tile")


@pytest.mark.parametrize("which", VARIANTS)
def test_filter_eps_never_skips_with_label_smoothing_gradient(which):
    h, w, y, b, ups = _filter_case()
    exact = _bwd(h, w, y, b, ups, None, with_sum=True, variant=which)
    filt = _bwd(h, w, y, b, ups, 1e-3, with_sum=True, variant=which)
    for f, e in zip(filt, exact, strict=False):
        torch.testing.assert_close(f, e, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------- deterministic backward


def _grads(h, w, y, b, ups, softcap=None, variant=None):
    """``tk.backward`` directly (dh, dW, db) after ``tk.forward``; upstream of all three outputs."""
    opts = make_options(IGN, softcap, None, variant)
    _, lse, _ = tk.forward(h, w, y, b, opts)
    g = [u.float() for u in ups]
    return tk.backward(h, w, y, b, lse, g[0], g[1], g[2], opts, (True, True, b is not None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_deterministic_backward_is_bitwise_reproducible(dtype):
    h, w, y, b, ups = make_linear_logprob(
        29, 24, 70, dtype=dtype, bias=True, n_ignore=5, wscale=2.0
    )
    first = _grads(h, w, y, b, ups, softcap=2.0, variant="deterministic")
    second = _grads(h, w, y, b, ups, softcap=2.0, variant="deterministic")
    for a, c in zip(first, second, strict=True):
        assert torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cols", [32, 64], ids=["chunk32", "chunk64"])
def test_chunked_backward_matches_one_chunk(dtype, cols, monkeypatch):
    """Several vocabulary chunks give one chunk's result, up to the fp32 summation order (the
    cross-chunk dh sum, the GEMM library's blocking for other shapes): same dz, same sums."""
    h, w, y, b, ups = make_linear_logprob(
        37, 50, 131, dtype=dtype, bias=True, n_ignore=4, wscale=2.0
    )
    one = _grads(h, w, y, b, ups, softcap=2.0, variant="deterministic")
    monkeypatch.setattr(tk, "CHUNK_COLUMNS", cols)
    many = _grads(h, w, y, b, ups, softcap=2.0, variant="deterministic")
    # fp32: summation order only; bf16: at most one rounding step of the 16-bit results
    tol = 1e-6 if dtype == torch.float32 else 2**-7
    for name, a, c in zip(("dh", "dW", "db"), many, one, strict=True):
        torch.testing.assert_close(a.float(), c.float(), rtol=tol, atol=tol, msg=name)
    assert (many[0][y == IGN] == 0).all()


def test_bf16_softcap_multi_chunk_within_twice_torch_error(variant, monkeypatch):
    monkeypatch.setattr(tk, "CHUNK_COLUMNS", 32)
    h, w, y, b, ups = make_linear_logprob(
        37, 50, 131, dtype=torch.bfloat16, bias=True, n_ignore=4, wscale=2.0
    )
    out64, g64 = run("reference", h.double(), w.double(), y, b.double(), ups, softcap=2.0)
    out_pt, g_pt = run("reference", h, w, y, b, ups, softcap=2.0)
    out_tk, g_tk = run("triton", h, w, y, b, ups, softcap=2.0)
    names = ("lp", "lse", "sum_logprob", "d_hidden", "d_weight", "d_bias")
    for name, got, pt, want in zip(names, out_tk + g_tk, out_pt + g_pt, out64 + g64, strict=True):
        assert got.dtype == pt.dtype, name
        assert_close(got, want, ref=pt, rtol=1e-4, name=name)


def test_variant_option_and_env_var_checked(monkeypatch):
    with pytest.raises(ValueError, match="triton_backward"):
        make_options(triton_backward="fast")
    h, w, y, _, _ = make_linear_logprob(6, 8, 21, dtype=torch.float32, wscale=2.0)
    monkeypatch.setenv(tu.BACKWARD_ENV, "fast")
    lp = rk.linear_logprob(h.requires_grad_(), w, y, impl="triton")
    with pytest.raises(ValueError, match=tu.BACKWARD_ENV):
        lp.sum().backward()
    # the option wins over the environment
    assert tu.backward_variant("atomic") == "atomic"
    monkeypatch.setenv(tu.BACKWARD_ENV, "atomic")
    assert tu.backward_variant(None) == "atomic"
    monkeypatch.delenv(tu.BACKWARD_ENV)
    assert tu.backward_variant(None) == "deterministic"


@pytest.mark.parametrize(
    "n_total,n_rows,vocab,elem,want",
    [
        pytest.param(16384, 16384, 128256, 2, 8192, id="N16k-V128k-bf16-256MiB"),
        pytest.param(16384, 4000, 128256, 2, 33536, id="N16k-4000active"),
        pytest.param(2**20, 2**20, 128256, 2, 1280, id="N1M-1pct"),
        pytest.param(64, 64, 1000, 4, 1000, id="small-V-one-chunk"),
        pytest.param(2**24, 2**24, 5000, 2, 128, id="floor-128"),
    ],
)
def test_chunk_columns_within_budget(n_total, n_rows, vocab, elem, want):
    cols = tu.chunk_columns(n_total, n_rows, vocab, elem)
    assert cols == want
    budget = max(tu.CHUNK_FRACTION * n_total * vocab * elem, tu.CHUNK_MIN_BYTES)
    if cols > tu.CHUNK_ALIGN:  # the 128-column floor is the documented exception
        assert n_rows * cols * elem <= budget


def test_vocab_splits_merge_an_all_minus_inf_row_as_one_split(monkeypatch):
    """A -inf bias over the whole vocabulary: every split's partial max is -inf. The merged
    log-sum-exp is -inf, as with one split and in the reference (the host merge computed
    ``exp(-inf - -inf)``: NaN), whatever the SM count makes the split count."""
    h, w, y, b, _ = make_linear_logprob(9, 16, 131, bias=True, n_ignore=0)
    b = torch.full_like(b, float("-inf"))
    ref = rk.linear_logprob(h, w, y, bias=b, impl="reference", return_stats=True)
    for splits in (1, 3):
        monkeypatch.setattr(tk, "_num_splits", lambda n, v, device, s=splits: s)
        with torch.no_grad():
            out = rk.linear_logprob(
                h.float(), w.float(), y, bias=b.float(), impl="triton", return_stats=True
            )
        assert (out[1] == float("-inf")).all(), (splits, out[1])
        assert_close(out[1].double(), ref[1], name=f"lse ({splits} splits)")
