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

pytestmark = pytest.mark.gpu

IGN = -100


@pytest.fixture(autouse=True)
def _needs_compiled_triton():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("TRITON_INTERPRET=1: run GPU tests with TRITON_INTERPRET=0")


def make(N, H, V, dtype, *, bias=False, ignore_frac=0.2, device="cuda", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(V, H, generator=g) * (2.0 / H**0.5)).to(device=device, dtype=dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < ignore_frac] = IGN
    y = y.to(device)
    h[y == IGN] = float("nan")
    b = torch.randn(V, generator=g).to(device=device, dtype=dtype) if bias else None
    ups = [torch.rand(N, generator=g, dtype=torch.float64).to(device) for _ in range(3)]
    ups[2] = ups[2] * 0.01
    return h, w, y, b, ups


def run(impl, h, w, y, b, ups, softcap=None, stats=True):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    out = rk.linear_logprob(h, w, y, bias=b, softcap=softcap, impl=impl, return_stats=True)
    used = tuple(out) if stats else out[:1]
    sum((o * u.to(o.dtype)).sum() for o, u in zip(used, ups, strict=False)).backward()
    return tuple(out) + (h.grad, w.grad) + (() if b is None else (b.grad,))


NAMES = ("lp", "lse", "sum_logprob", "d_hidden", "d_weight", "d_bias")


def check_within_twice_torch(h, w, y, b, ups, softcap, rel_atol=5e-4):
    """Triton error vs float64 <= 2x plain PyTorch's error in the same dtype + rel_atol*scale."""
    d = lambda t: None if t is None else t.double()
    want = run("reference", d(h), d(w), y, d(b), ups, softcap)
    pt = run("reference", h, w, y, b, ups, softcap)
    got = run("triton", h, w, y, b, ups, softcap)
    report = {}
    for name, gt, p, wt in zip(NAMES, got, pt, want, strict=False):
        assert gt.dtype == p.dtype and gt.shape == p.shape, name
        assert torch.isfinite(gt).all(), f"{name} has non-finite entries"
        err = (gt.double() - wt).abs().max().item()
        err_pt = (p.double() - wt).abs().max().item()
        report[name] = (err, err_pt)
        assert err <= 2 * err_pt + rel_atol * wt.abs().max().item(), (
            f"{name}: triton err {err:.3g} vs torch err {err_pt:.3g}"
        )
    print({k: f"{a:.2e}/{p:.2e}" for k, (a, p) in report.items()})
    return got


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
    h, w, y, b, ups = make(*shape, torch.bfloat16, bias=bias)
    got = check_within_twice_torch(h, w, y, b, ups, softcap)
    ign = y == IGN
    assert (got[3][ign] == 0).all(), "ignored rows got a hidden gradient"


def test_fp16_within_twice_torch_error():
    h, w, y, b, ups = make(1031, 512, 10007, torch.float16, bias=True)
    check_within_twice_torch(h, w, y, b, ups, None)


def test_fp32_is_ieee_not_tf32():
    # TF32 (10-bit mantissa) would give ~1e-3 relative error here; IEEE fp32 gives ~1e-6.
    h, w, y, b, ups = make(515, 1024, 4099, torch.float32, bias=True)
    d = lambda t: None if t is None else t.double()
    want = run("reference", d(h), d(w), y, d(b), ups)
    got = run("triton", h, w, y, b, ups)
    for name, gt, wt in zip(NAMES, got, want, strict=False):
        err = (gt.double() - wt).abs().max().item()
        assert err <= 2e-5 * wt.abs().max().item(), f"{name}: {err:.3g}"


def test_memory_does_not_scale_with_n_times_v():
    N, H, V = 8192, 1024, 65536  # N*V fp32 logits would be 2 GiB
    h, w, y, _, ups = make(N, H, V, torch.bfloat16, ignore_frac=0.1)
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
    h, w, y, b, ups = make(1000, 256, 5003, torch.bfloat16, bias=True)
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
    h, w, y, _, ups = make(N, H, V, torch.bfloat16, ignore_frac=0.15)
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
        err = (o.double() - wt.double()).abs().max().item()
        err_cce = (t.double() - wt.double()).abs().max().item()
        print(f"{name}: ours {err:.3g}, cce {err_cce:.3g}")
        assert err <= 2 * err_cce + 1e-3 * wt.abs().max().item(), name
