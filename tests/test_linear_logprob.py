"""linear_logprob reference vs PyTorch's own cross-entropy, statistics, gradcheck, bad input.
(The fused kernels are held to this reference in test_linear_logprob_cpu/_triton.py.)"""

import pytest
import torch
import torch.nn.functional as F

import rag_kernels as rk
from rag_kernels.ops.linear_logprob import LinearLogprobFunction
from toolkit import impl_params, make_linear_logprob, require_impl

SHAPES = [(1, 1, 2), (37, 50, 1031), (8, 16, 33)]


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}H{}V{}".format(*s))
def test_reference_matches_cross_entropy(shape, bias):
    N = shape[0]
    h, w, y, b, _ = make_linear_logprob(*shape, bias=bias, n_ignore=min(3, N - 1), poison=False)
    stats = rk.linear_logprob(h, w, y, bias=b, impl="reference", return_stats=True)
    logits = F.linear(h, w, b)
    keep = y != -100
    want_lp = -F.cross_entropy(logits, y, reduction="none", ignore_index=-100)
    torch.testing.assert_close(stats.logprob, want_lp, rtol=1e-12, atol=1e-12)
    want_lse = torch.where(keep, torch.logsumexp(logits, -1), 0.0)
    torch.testing.assert_close(stats.lse, want_lse, rtol=1e-12, atol=1e-12)
    want_s = torch.where(keep, F.log_softmax(logits, -1).sum(-1), 0.0)
    torch.testing.assert_close(stats.sum_logprob, want_s, rtol=1e-12, atol=1e-9)


def test_softcap_matches_capped_logits():
    h, w, y, _, _ = make_linear_logprob(9, 7, 23, n_ignore=3, poison=False)
    c = 2.5
    got = rk.linear_logprob(h * 4, w, y, softcap=c, impl="reference")
    z = c * torch.tanh((h * 4) @ w.T / c)
    torch.testing.assert_close(
        got, -F.cross_entropy(z, y, reduction="none"), rtol=1e-12, atol=1e-12
    )


def test_ignored_rows_zero_and_no_gradient():
    h, w, y, _, _ = make_linear_logprob(11, 5, 17, n_ignore=4)  # NaN rows: must not leak
    h.requires_grad_()
    w.requires_grad_()
    stats = rk.linear_logprob(h, w, y, impl="reference", return_stats=True)
    ign = y == -100
    assert (stats.logprob[ign] == 0).all() and (stats.lse[ign] == 0).all()
    up = torch.rand(11, dtype=torch.float64)
    (stats.logprob * up + stats.lse * up.flip(0) + stats.sum_logprob * 0.01).sum().backward()
    assert torch.isfinite(w.grad).all()
    assert (h.grad[ign] == 0).all() and torch.isfinite(h.grad[~ign]).all()


def test_leading_dims_and_int32_target():
    h, w, y, _, _ = make_linear_logprob(12, 6, 19, n_ignore=3, poison=False)
    flat = rk.linear_logprob(h, w, y, impl="reference")
    got = rk.linear_logprob(h.view(3, 4, 6), w, y.view(3, 4).int(), impl="reference")
    assert got.shape == (3, 4)
    torch.testing.assert_close(got.reshape(-1), flat)


@pytest.mark.parametrize("softcap", [None, 3.0], ids=["nocap", "softcap"])
def test_gradcheck(softcap):
    h, w, y, b, _ = make_linear_logprob(5, 4, 7, bias=True, n_ignore=1, poison=False)
    h.requires_grad_(), w.requires_grad_(), b.requires_grad_()

    def fn(h, w, b):
        s = rk.linear_logprob(h, w, y, bias=b, softcap=softcap, impl="reference", return_stats=True)
        return s.logprob, s.lse, s.sum_logprob

    assert torch.autograd.gradcheck(fn, (h, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision_returns_fp32(dtype):
    h, w, y, _, _ = make_linear_logprob(6, 8, 21, dtype=dtype, n_ignore=3, poison=False)
    assert rk.linear_logprob(h, w, y, impl="reference").dtype == torch.float32


def _args():
    h, w, y, b, _ = make_linear_logprob(4, 3, 5, dtype=torch.float32, bias=True)
    return dict(hidden=h, weight=w, target=y, bias=b)


def _with(**kw):
    d = _args()
    d.update(kw)
    return d


BAD = {
    "hidden_not_tensor": (_with(hidden=1.0), TypeError, "hidden"),
    "hidden_int": (_with(hidden=torch.zeros(4, 3, dtype=torch.long)), TypeError, "hidden"),
    "weight_rank": (_with(weight=torch.zeros(5, 3, 1)), ValueError, "weight"),
    "weight_H": (_with(weight=torch.zeros(5, 4)), ValueError, "weight"),
    "weight_dtype": (_with(weight=torch.zeros(5, 3, dtype=torch.float64)), TypeError, "weight"),
    "weight_device": (_with(weight=torch.zeros(5, 3, device="meta")), ValueError, "weight"),
    "target_float": (_with(target=torch.zeros(4)), TypeError, "target"),
    "target_shape": (_with(target=torch.zeros(5, dtype=torch.long)), ValueError, "target"),
    "target_too_big": (_with(target=torch.tensor([0, 1, 5, 2])), ValueError, "target"),
    "target_negative": (_with(target=torch.tensor([0, -1, 2, 2])), ValueError, "target"),
    "bias_shape": (_with(bias=torch.zeros(6)), ValueError, "bias"),
    "bias_dtype": (_with(bias=torch.zeros(5, dtype=torch.float64)), TypeError, "bias"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case):
    kw, exc, name = BAD[case]
    kw = dict(kw)
    with pytest.raises(exc, match=name):
        rk.linear_logprob(kw.pop("hidden"), kw.pop("weight"), kw.pop("target"), **kw)


@pytest.mark.parametrize("arg,value", [("softcap", -1.0), ("impl", "gpu"), ("softcap", "x")])
def test_bad_options(arg, value):
    d = _args()
    with pytest.raises(ValueError, match=arg):
        rk.linear_logprob(d["hidden"], d["weight"], d["target"], **{arg: value})


def test_cpu_impl_rejects_cuda_style_request_on_cpu_without_interpreter(monkeypatch):
    require_impl("linear_logprob", "triton")  # before the interpreter is switched off below
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    d = _args()
    with pytest.raises(ValueError, match="triton"):
        rk.linear_logprob(d["hidden"], d["weight"], d["target"], impl="triton")


# ------------------------------------------------------- target shared across documents

FUSED = impl_params("linear_logprob")


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("impl", FUSED)
def test_shared_target_matches_expanded(impl, bias):
    """target [B, 1, T] against hidden [B, K, T, H] (what rag_loss passes: the K documents
    share the ids, no K-fold copy) == the materialised [B, K, T] target, values and grads."""
    B, K, T, H, V = 3, 4, 5, 6, 41
    dtype = torch.float32 if impl == "triton" else torch.float64
    h, w, _, b, _ = make_linear_logprob(B * K * T, H, V, dtype=dtype, bias=bias)
    y = torch.randint(0, V, (B, 1, T), generator=torch.Generator().manual_seed(1))
    y[0, 0, :2] = -100
    y[2, 0, -1] = -100
    h = h.view(B, K, T, H)
    h[0, :, :2] = float("nan")  # ignored rows are never read
    up = torch.rand(3, B, K, T, dtype=dtype)
    res = []
    for tgt in (y, y.expand(B, K, T).contiguous()):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        bb = None if b is None else b.clone().requires_grad_()
        s = rk.linear_logprob(hh, ww, tgt, bias=bb, impl=impl, return_stats=True)
        assert s.logprob.shape == (B, K, T)
        (s.logprob * up[0] + s.lse * up[1] + s.sum_logprob * up[2]).sum().backward()
        res.append(
            [s.logprob, s.lse, s.sum_logprob, hh.grad.nan_to_num(), ww.grad]
            + ([] if bb is None else [bb.grad])
        )
    for got, want in zip(*res, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # same rows, same order
    assert (res[0][0][0, :, :2] == 0).all()


@pytest.mark.parametrize("impl", impl_params("linear_logprob", ("cpu", "triton")))
def test_shared_target_reaches_kernels_unexpanded(impl, monkeypatch):
    """The fused kernels receive the [B, T] ids themselves (B*T ints), not B*K*T."""
    seen = []
    orig = LinearLogprobFunction.forward

    def spy(ctx, hidden, weight, target, *rest):
        seen.append(tuple(target.shape))
        return orig(ctx, hidden, weight, target, *rest)

    monkeypatch.setattr(LinearLogprobFunction, "forward", staticmethod(spy))
    B, K, T, H, V = 2, 3, 4, 5, 13
    h, w, _, _, _ = make_linear_logprob(B * K * T, H, V, dtype=torch.float32)
    y = torch.randint(0, V, (B, T))
    rk.rag_loss(h.view(B, K, T, H), w, y, torch.zeros(B, K), impl=impl)
    assert seen == [(B, T)]


@pytest.mark.parametrize(
    "tshape", [(1, 3, 1), (2, 4, 5), (2, 3), (2, 3, 5, 1)], ids=lambda s: "x".join(map(str, s))
)
def test_shared_target_bad_layouts(tshape):
    """Only one run of leading dims may be broadcast; anything else names target."""
    h = torch.zeros(2, 3, 5, 4)
    with pytest.raises(ValueError, match="target"):
        rk.linear_logprob(h, torch.zeros(7, 4), torch.zeros(tshape, dtype=torch.long))


@pytest.mark.parametrize("impl", FUSED)
def test_shared_target_over_two_dims(impl):
    """[B, 1, 1] against [B, K, T, H]: every row of query b reads the same id."""
    dtype = torch.float32 if impl == "triton" else torch.float64
    h, w, _, _, _ = make_linear_logprob(2 * 3 * 4, 5, 11, dtype=dtype)
    y = torch.tensor([[[3]], [[7]]])
    got = rk.linear_logprob(h.view(2, 3, 4, 5), w, y, impl=impl)
    want = rk.linear_logprob(h, w, y.reshape(2, 1).expand(2, 12).reshape(-1), impl="reference")
    torch.testing.assert_close(got.reshape(-1), want)


def test_expanded_target_traces_under_dynamic_compile():
    """A target expanded with a Python-int K equal to hidden's (symbolic) K: the layout check
    wrote `t in (h, 1)`, which dynamo evaluates as False for an int equal to a SymInt, so
    fullgraph dynamic compilation of a valid call raised "target must have shape"."""
    require_impl("linear_logprob", "cpu")
    B, K, T, H, V = 2, 3, 5, 7, 11
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(B, K, T, H, generator=g), torch.randn(V, H, generator=g)
    tgt = torch.randint(0, V, (B, T), generator=g)

    def fn(h, w, tgt):
        return rk.linear_logprob(h, w, tgt[:, None, :].expand(B, K, T), impl="cpu")

    torch._dynamo.reset()
    got = torch.compile(fn, dynamic=True, fullgraph=True, backend="eager")(h, w, tgt)
    torch.testing.assert_close(got, fn(h, w, tgt), rtol=0, atol=0)
