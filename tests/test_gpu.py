"""GPU-only checks of the Triton kernels (skipped without CUDA): larger bf16 shapes against a
float64 ground truth, fp32 exactness (no TF32), memory that never scales with N*V, no host
synchronisation, and a comparison with Cut Cross-Entropy when it is installed.

Run on a GPU machine with the interpreter OFF: ``TRITON_INTERPRET=0 pytest -m gpu tests/test_gpu.py``
(``benchmarks/device_check.sh`` does this). ``RAG_KERNELS_AUTOTUNE=0`` keeps compile time short.
"""

import os

import pytest
import torch

import rag_kernels as rk
from rag_kernels.ops.validation import set_value_checks, value_checks_enabled
from toolkit import IGNORE as IGN
from toolkit import assert_close, make_linear_logprob

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_compiled_triton():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("TRITON_INTERPRET=1: run GPU tests with TRITON_INTERPRET=0")


# weight ~ N(0, 4 / H), ~20% of the rows ignored (NaN hidden states), tensors on the GPU
GPU = dict(wscale=2.0, device="cuda")


def run(impl, h, w, y, b, ups, softcap=None, stats=True):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    out = rk.linear_logprob(h, w, y, bias=b, softcap=softcap, impl=impl, return_stats=True)
    used = tuple(out) if stats else out[:1]
    sum((o * u.to(o.dtype)).sum() for o, u in zip(used, ups, strict=False)).backward()
    return tuple(out) + (h.grad, w.grad) + (() if b is None else (b.grad,))


NAMES = ("lp", "lse", "sum_logprob", "d_hidden", "d_weight", "d_bias")


def run_three(h, w, y, b, ups, softcap):
    """``(triton, plain PyTorch in the same dtype, float64 truth)`` outputs and gradients."""
    d = lambda t: None if t is None else t.double()
    want = run("reference", d(h), d(w), y, d(b), ups, softcap)
    pt = run("reference", h, w, y, b, ups, softcap)
    got = run("triton", h, w, y, b, ups, softcap)
    return got, pt, want


def assert_within_twice_torch(got, pt, want, rtol=5e-4):
    """Triton error vs float64 <= 2x plain PyTorch's error in the same dtype + rtol*scale."""
    report = {}
    for name, gt, p, wt in zip(NAMES, got, pt, want, strict=False):
        assert gt.dtype == p.dtype and gt.shape == p.shape, name
        assert torch.isfinite(gt).all(), f"{name} has non-finite entries"
        report[name] = assert_close(gt, wt, ref=p, rtol=rtol, name=name)
    print({k: f"{c.err:.2e}/{c.ref_err:.2e}" for k, c in report.items()})


CASES = {
    # multiple row blocks, odd sizes, bias + softcap
    "N2053H1024V32011_bias_softcap": ((2053, 1024, 32011), True, 30.0),
    # few rows: the forward splits the vocabulary across programs
    "N67H2048V50257": ((67, 2048, 50257), False, None),
    "N4096H768V8192_bias": ((4096, 768, 8192), True, None),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bf16_within_twice_torch_error(case):
    shape, bias, softcap = CASES[case]
    h, w, y, b, ups = make_linear_logprob(
        *shape, dtype=torch.bfloat16, bias=bias, ignore_frac=0.2, **GPU
    )
    got, pt, want = run_three(h, w, y, b, ups, softcap)
    assert_within_twice_torch(got, pt, want)
    ign = y == IGN
    assert (got[3][ign] == 0).all(), "ignored rows got a hidden gradient"


def test_fp16_within_twice_torch_error():
    h, w, y, b, ups = make_linear_logprob(
        1031, 512, 10007, dtype=torch.float16, bias=True, ignore_frac=0.2, **GPU
    )
    assert_within_twice_torch(*run_three(h, w, y, b, ups, None))


def test_fp32_is_ieee_not_tf32():
    # TF32 (10-bit mantissa) would give ~1e-3 relative error here; IEEE fp32 gives ~1e-6.
    h, w, y, b, ups = make_linear_logprob(
        515, 1024, 4099, dtype=torch.float32, bias=True, ignore_frac=0.2, **GPU
    )
    d = lambda t: None if t is None else t.double()
    want = run("reference", d(h), d(w), y, d(b), ups)
    got = run("triton", h, w, y, b, ups)
    for name, gt, wt in zip(NAMES, got, want, strict=False):
        assert_close(gt, wt, rtol=2e-5, name=name)


def test_memory_does_not_scale_with_n_times_v():
    N, H, V = 8192, 1024, 65536  # N*V fp32 logits would be 2 GiB
    h, w, y, _, ups = make_linear_logprob(N, H, V, dtype=torch.bfloat16, ignore_frac=0.1, **GPU)
    h.requires_grad_()
    w.requires_grad_()
    rk.linear_logprob(h, w, y, impl="triton").sum().backward()  # compile / warm up
    h.grad = w.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    lp = rk.linear_logprob(h, w, y, impl="triton")
    fwd_peak = torch.cuda.max_memory_allocated() - base
    (lp * ups[0].float()).sum().backward()
    bwd_peak = torch.cuda.max_memory_allocated() - base
    # forward: a few [splits, N] fp32 partials; backward: fp32 dh/dW buffers + bf16 copies.
    assert fwd_peak < 64 * N * 4 + (8 << 20), fwd_peak
    assert bwd_peak < (V * H + N * H) * 6 + 2 * N * 64 + (64 << 20), bwd_peak
    print(f"fwd extra {fwd_peak / 2**20:.1f} MiB, fwd+bwd extra {bwd_peak / 2**20:.1f} MiB")


def test_no_host_sync_after_warmup():
    h, w, y, b, ups = make_linear_logprob(
        1000, 256, 5003, dtype=torch.bfloat16, bias=True, ignore_frac=0.2, **GPU
    )
    run("triton", h, w, y, b, ups)  # compile / autotune (which synchronises) first
    was = value_checks_enabled()
    set_value_checks(False)  # the target-range check reads data on purpose
    try:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        run("triton", h, w, y, b, ups)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        set_value_checks(was)


def test_matches_cut_cross_entropy():
    cce = pytest.importorskip("cut_cross_entropy")
    N, H, V = 4093, 2048, 32003
    h, w, y, _, ups = make_linear_logprob(N, H, V, dtype=torch.bfloat16, ignore_frac=0.15, **GPU)
    h = torch.where((y == IGN)[:, None], torch.zeros((), dtype=h.dtype, device=h.device), h)
    keep = y != IGN

    def grads(fn, dtype=torch.bfloat16):
        hh = h.detach().to(dtype).requires_grad_()
        ww = w.detach().to(dtype).requires_grad_()
        lp = fn(hh, ww)
        (lp * ups[0].to(lp.dtype)).sum().backward()
        return lp, hh.grad, ww.grad

    ours = grads(lambda hh, ww: rk.linear_logprob(hh, ww, y, impl="triton"))
    theirs = grads(
        lambda hh, ww: (
            -cce.linear_cross_entropy(
                hh, ww, y, ignore_index=IGN, reduction="none", impl="cce", filter_eps=None
            )
        )
    )
    want = grads(lambda hh, ww: rk.linear_logprob(hh, ww, y, impl="reference"), torch.float64)
    for name, o, t, wt in zip(("lp", "d_hidden", "d_weight"), ours, theirs, want, strict=False):
        if name == "lp":
            o, t, wt = o[keep], t[keep], wt[keep]
        c = assert_close(o, wt, ref=t, rtol=1e-3, name=f"{name} (ref: Cut Cross-Entropy)")
        print(f"{name}: ours {c.err:.3g}, cce {c.ref_err:.3g}")
