"""The test toolkit itself: the tolerance rule and its messages, impl parametrisation."""

import pytest
import torch

from toolkit import (
    IGNORE,
    assert_close,
    impl_params,
    make_linear_logprob,
    make_token_smoothing,
    poisoned,
)


def test_scaled_relative_bound():
    e = torch.tensor([10.0, 1.0, 0.0], dtype=torch.float64)
    c = assert_close(e + 0.9e-5, e, rtol=1e-6, atol=0.0)  # 0.9e-5 <= 1e-6 * max|e|
    assert c.err == pytest.approx(0.9e-5) and c.bound == pytest.approx(1e-5)
    with pytest.raises(AssertionError, match="lp"):
        assert_close(e + 2e-5, e, rtol=1e-6, name="lp")
    assert_close(e + 1.5e-5, e, rtol=1e-6, atol=1e-5)


def test_elementwise_relative_term():
    e = torch.tensor([100.0, 1.0], dtype=torch.float64)
    a = e * (1 + 1e-5)
    assert_close(a, e, elem_rtol=1e-5 + 1e-12)
    with pytest.raises(AssertionError):
        assert_close(a, e, elem_rtol=0.5e-5)


def test_failure_message_names_the_worst_element():
    e = torch.zeros(2, 3, dtype=torch.float64)
    a = e.clone()
    a[1, 2] = 0.5
    a[0, 1] = 0.1
    with pytest.raises(AssertionError) as info:
        assert_close(a.float(), e, rtol=1e-3, atol=1e-3, name="grad_hidden")
    msg = str(info.value)
    assert "grad_hidden" in msg and "(1, 2)" in msg and "actual 0.5" in msg
    assert "allowed" in msg and "0 NaN, 0 inf" in msg and "2 of 6 elements over" in msg


def test_nan_in_actual_always_fails():
    e = torch.ones(4, dtype=torch.float64)
    a = e.clone()
    a[2] = float("nan")
    with pytest.raises(AssertionError, match=r"\(2,\).*1 NaN"):
        assert_close(a, e, rtol=1.0, atol=1.0, name="lse")
    with pytest.raises(AssertionError, match="NaN"):
        assert_close(a, e, ref=e, rtol=1.0, atol=1.0)
    both = torch.tensor([float("nan"), 1.0])
    with pytest.raises(AssertionError):
        assert_close(both, both)
    assert_close(both, both, equal_nan=True)
    inf = torch.tensor([float("inf"), 1.0])
    assert_close(inf, inf)


def test_twice_plain_pytorch_rule():
    truth = torch.linspace(-1, 1, 11, dtype=torch.float64)
    plain = truth + 1e-3  # plain PyTorch's error: 1e-3
    assert_close(truth + 2e-3, truth, ref=plain)
    c = assert_close(truth - 2.3e-3, truth, ref=plain, rtol=3e-4, atol=1e-4)
    assert c.ref_err == pytest.approx(1e-3) and c.bound == pytest.approx(2.4e-3)
    with pytest.raises(AssertionError, match=r"2 \* plain-PyTorch err"):
        assert_close(truth + 2.2e-3, truth, ref=plain, name="d_weight")


def test_impl_params_skip_with_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # triton then needs a CUDA device
    params = {p.id: p for p in impl_params("linear_logprob")}
    assert list(params) == ["reference", "cpu", "triton"]
    assert not params["reference"].marks
    if not torch.cuda.is_available():
        (mark,) = params["triton"].marks
        assert mark.name == "skip" and "CUDA" in mark.kwargs["reason"]


def test_impl_params_dtypes():
    params = {p.id: p for p in impl_params("token_smoothing", dtypes=(torch.float64,))}
    assert params["reference-fp64"].values == ("reference", torch.float64)
    (mark,) = params["triton-fp64"].marks
    assert "fp32 / bf16 / fp16" in mark.kwargs["reason"]


def test_factories_poison_and_seed():
    h, w, y, b, ups = make_linear_logprob(20, 4, 9, n_ignore=5, bias=True, dtype=torch.float32)
    ign = y == IGNORE
    assert int(ign.sum()) == 5 and torch.isnan(h[ign]).all() and torch.isfinite(h[~ign]).all()
    assert h.dtype == w.dtype == b.dtype == torch.float32 and len(ups) == 3
    again = make_linear_logprob(20, 4, 9, n_ignore=5, bias=True, dtype=torch.float32)
    assert torch.equal(again.weight, w) and torch.equal(again.target, y)
    case = make_token_smoothing(2, 3, 2, 4, 5, doc_mask=True)
    assert case.doc_mask.tolist() == [[True, True, False], [False, True, True]]
    hp = poisoned(case.hidden, ~case.doc_mask)
    assert torch.isnan(hp[~case.doc_mask]).all() and torch.isfinite(hp[case.doc_mask]).all()
