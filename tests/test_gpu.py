"""GPU correctness of every Triton kernel and of ``rk.rag_loss`` (marked ``gpu``; skipped
without CUDA and under ``TRITON_INTERPRET=1``).

``benchmarks/device_check.sh`` runs this file first, with autotuning ON (``RAG_KERNELS_AUTOTUNE``
unset or 1, so the configs the benchmarks then time are tuned the same way), a per-test time
limit and a progress log (tests/conftest.py); by hand:
``TRITON_INTERPRET=0 pytest -m gpu -v tests/test_gpu.py``.

Every numeric check applies the tolerance rule (docs/design.md §6) to each output and every
gradient, under non-uniform upstream gradients: ``err(triton) <= 2 err(plain PyTorch in the same
dtype) + rtol * max|truth| + atol``, ``err`` against a float64 ground truth computed on the GPU
from the same (rounded) inputs (an fp32 truth where fp64 copies would not fit: the contrastive
tests past 2^31 elements). Ignored rows, masked tokens and masked documents hold NaN.

* linear_logprob: bf16 / fp16 / fp32 (IEEE, never TF32), odd shapes, bias, softcap, the
  statistics' gradients, ignored rows; the benchmark's own specialisation (16-divisible sizes,
  N=2048, H=4096, V=128256); every autotune config forced in turn, for both backward variants
  ("deterministic", the default, and "atomic"; chosen through the public API); both variants;
  ``filter_eps`` within its error bound; row offsets past 2^31 elements; memory that never
  scales with N*V; no host synchronisation; Cut Cross-Entropy as a second opinion.
* token_smoothing (with and without the target log-probs), marginalisation (RAG-Sequence and
  RAG-Token, fp64 too), contrastive (cos / dot, index and mask positives, doc ids, symmetric,
  learnable scale; offsets past 2^31; memory O(B + M)), fp32 and bf16.
* rag_loss end to end: sequence / token, label smoothing 0 and 0.1, bias, softcap, doc mask.
* Unwritten outputs: each op once with ``torch.empty`` returning NaN.
* Determinism: two backward passes of the default variant are bitwise equal.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch

import rag_kernels as rk
from rag_kernels.ops import linear_logprob as lp_module
from rag_kernels.ops import registry
from rag_kernels.ops.contrastive.reference import contrastive_loss_reference, similarity_inputs
from rag_kernels.ops.token_smoothing import token_smoothing_with_logprob
from rag_kernels.ops.validation import set_value_checks, value_checks_enabled
from toolkit import IGNORE as IGN
from toolkit import (
    assert_close,
    dtype_id,
    make_contrastive,
    make_linear_logprob,
    make_marginalize,
    make_rag,
    make_token_smoothing,
    nan_filled_empty,
    nan_scratch,
)

pytestmark = pytest.mark.gpu

DEV = "cuda"
BF16, FP16, FP32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
# Tests that hold tens of GB run one after another on one pytest-xdist worker.
BIG = pytest.mark.xdist_group("gpu-bigmem")
# The element count past which int32 offsets wrap, and the sizes of the tests that go past it.
INT32 = 2**31
LP_BIG = dict(H=4096, V=1024, extra_rows=4096, checked=2048)
TS_BIG = dict(K=8, H=4096, V=256, extra_positions=64, checked=48)
CON_BIG_MASK = dict(B=32768, M=70000, D=64, duplicates=1000, checked=256)
CON_BIG_D = dict(B=128, D=768, extra_candidates=4096, checked=4096)
# Relative term of the rule (times max|truth|) per dtype, on top of 2x plain PyTorch's error.
RTOL = {BF16: 5e-4, FP16: 5e-4, FP32: 1e-5, F64: 1e-12}
ATOL = {BF16: 0.0, FP16: 0.0, FP32: 1e-5, F64: 1e-12}
# d_scale (contrastive) is one number summed over B * M rounded products: its rounding error
# is a random walk whose ratio to plain PyTorch's swings, so the scalar gets one bf16 rounding
# (2^-8 relative) on top of the rule.
SCALAR_RTOL = {BF16: 2**-8, FP16: 2**-10, FP32: 1e-5, F64: 1e-12}
DTYPES = [pytest.param(FP32, id="fp32"), pytest.param(BF16, id="bf16")]
# The Triton backward variants of linear_logprob and token_smoothing; the default is
# "deterministic" (chunked logit gradients + cuBLAS GEMMs), "atomic" is one kernel with fp32
# atomics. Selected through the public API (select_backward).
BACKWARDS = getattr(lp_module, "TRITON_BACKWARDS", ("deterministic", "atomic"))
BACKWARD_ENV = "RAG_KERNELS_TRITON_BACKWARD"


@pytest.fixture(autouse=True)
def _needs_compiled_triton():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("TRITON_INTERPRET=1: run GPU tests with TRITON_INTERPRET=0")
    yield
    torch.cuda.empty_cache()  # the next test (another worker's too) gets the memory back


# ----------------------------------------------------------------------------- helpers


def d64(t):
    return None if t is None else t.detach().double()


def leaves(*xs):
    """Fresh leaf copies (requires_grad) of the tensors in ``xs``; None stays None."""
    return [None if x is None else x.detach().clone().requires_grad_() for x in xs]


def gpu(t, dtype=None):
    return None if t is None else t.to(device=DEV, dtype=dtype if t.is_floating_point() else None)


def select_backward(variant: str | None, fn, monkeypatch) -> dict:
    """Pick the Triton backward ``variant`` of ``fn`` (None: the default) through the public
    API: the keyword arguments to pass when ``fn`` takes ``triton_backward``, else {} with
    $RAG_KERNELS_TRITON_BACKWARD set (the kernels read it at each call)."""
    monkeypatch.delenv(BACKWARD_ENV, raising=False)
    if variant is None:
        return {}
    if "triton_backward" in inspect.signature(fn).parameters:
        return {"triton_backward": variant}
    monkeypatch.setenv(BACKWARD_ENV, variant)
    return {}


def check_rule(names, got, plain, truth, dtype, *, what="", rtol=None, atol=None):
    """The tolerance rule for every (name, got, plain, truth); a None in ``got`` must be None
    in ``plain`` too; a 0-d result gets SCALAR_RTOL. Prints the measured errors (the device
    check's ``-rP`` puts them in its log for the passing tests too)."""
    atol = ATOL[dtype] if atol is None else atol
    report = {}
    for name, g, p, t in zip(names, got, plain, truth, strict=True):
        tol = SCALAR_RTOL[dtype] if p is not None and p.dim() == 0 else RTOL[dtype]
        tol = tol if rtol is None else rtol
        if p is None:
            assert g is None, f"{what}{name}: expected None, got a tensor"
            continue
        assert g is not None, f"{what}{name}: got None"
        assert g.dtype == p.dtype and g.shape == p.shape, (
            f"{what}{name}: {g.dtype} {tuple(g.shape)} vs plain PyTorch {p.dtype} {tuple(p.shape)}"
        )
        bad = ~torch.isfinite(g)
        assert not bad.any(), f"{what}{name}: {int(bad.sum())} non-finite entries"
        report[name] = assert_close(g, t, ref=p, rtol=tol, atol=atol, name=f"{what}{name}")
    print(what, {k: f"{c.err:.2e} (plain {c.ref_err:.2e})" for k, c in report.items()})
    return report


def assert_bitwise_equal(names, a, b, what=""):
    for name, x, y in zip(names, a, b, strict=True):
        if x is None:
            assert y is None, name
            continue
        diff = int((x != y).sum()) if x.shape == y.shape else -1
        assert torch.equal(x, y), f"{what}{name}: two runs differ in {diff} of {x.numel()} entries"


def autotuners(op: str) -> list[tuple[str, object]]:
    """``(name, Autotuner)`` for every ``triton.autotune`` kernel of ``op``'s Triton module
    (module attributes, values of dicts such as ``_FWD[16]``, through ``triton.heuristics``)."""
    from triton.runtime.autotuner import Autotuner

    found, seen = [], set()
    for name, obj in sorted(vars(registry.kernels(op, "triton")).items()):
        for key, o in obj.items() if isinstance(obj, dict) else [(None, obj)]:
            for _ in range(4):  # heuristics(autotune(jit)) and the like
                if o is None or isinstance(o, Autotuner):
                    break
                o = getattr(o, "fn", None)
            if isinstance(o, Autotuner) and id(o) not in seen:
                seen.add(id(o))
                found.append((name if key is None else f"{name}[{key}]", o))
    return found


# ----------------------------------------------------------------------------- linear_logprob

# weight ~ N(0, 4 / H), ~20% of the rows ignored (NaN hidden states), tensors on the GPU
GPU = dict(wscale=2.0, device=DEV)
LP_NAMES = ("lp", "lse", "sum_logprob", "d_hidden", "d_weight", "d_bias")


def lp_run(impl, h, w, y, b, ups, softcap=None, stats=True, **kw):
    """Outputs and gradients of ``rk.linear_logprob`` under the upstream weights ``ups``
    (lp, lse, sum_logprob; with ``stats=False`` only lp's)."""
    h, w, b = leaves(h, w, b)
    out = rk.linear_logprob(h, w, y, bias=b, softcap=softcap, impl=impl, return_stats=True, **kw)
    used = tuple(out) if stats else out[:1]
    sum((o * u.to(o.dtype)).sum() for o, u in zip(used, ups, strict=False)).backward()
    return [*out, h.grad, w.grad, None if b is None else b.grad]


def lp_plain_and_truth(h, w, y, b, ups, softcap=None, stats=True):
    plain = lp_run("reference", h, w, y, b, ups, softcap, stats)
    truth = lp_run("reference", d64(h), d64(w), y, d64(b), ups, softcap, stats)
    return plain, truth


def lp_check(h, w, y, b, ups, softcap=None, stats=True, what="", **kw):
    dtype = h.dtype
    plain, truth = lp_plain_and_truth(h, w, y, b, ups, softcap, stats)
    got = lp_run("triton", h, w, y, b, ups, softcap, stats, **kw)
    check_rule(LP_NAMES, got, plain, truth, dtype, what=what)
    assert (got[3][y == IGN] == 0).all(), "ignored rows got a hidden gradient"
    return got


LP_CASES = {
    # several row blocks, odd sizes, bias + softcap
    "N2053H1024V32011_bias_softcap": ((2053, 1024, 32011), True, 30.0),
    # few rows: the forward splits the vocabulary across programs
    "N67H2048V50257": ((67, 2048, 50257), False, None),
    "N4096H768V8192_bias": ((4096, 768, 8192), True, None),
}
# 16-divisible sizes (as N=16384, H=4096, V=128256): the specialisation the benchmark compiles,
# no bias / softcap, lp only, as there
LP_BENCH_VARIANT = (2048, 4096, 128256)


def test_linear_logprob_benchmark_specialisation():
    N, H, V = LP_BENCH_VARIANT
    h, w, y, b, ups = make_linear_logprob(N, H, V, dtype=BF16, ignore_frac=0.1, **GPU)
    lp_check(h, w, y, None, ups, stats=False)


@pytest.mark.parametrize("case", list(LP_CASES), ids=list(LP_CASES))
def test_linear_logprob_bf16(case, monkeypatch):
    shape, bias, softcap = LP_CASES[case]
    h, w, y, b, ups = make_linear_logprob(*shape, dtype=BF16, bias=bias, ignore_frac=0.2, **GPU)
    kernels = registry.kernels("linear_logprob", "triton")
    if hasattr(kernels, "_empty"):
        nan_scratch(monkeypatch, kernels)  # an unwritten partial shows up as NaN
    lp_check(h, w, y, b, ups, softcap)


def test_linear_logprob_fp16():
    h, w, y, b, ups = make_linear_logprob(
        1031, 512, 10007, dtype=FP16, bias=True, ignore_frac=0.2, **GPU
    )
    lp_check(h, w, y, b, ups, softcap=20.0)


def test_linear_logprob_fp32_is_ieee_not_tf32():
    # TF32 (10-bit mantissa) would give ~1e-3 relative error here; IEEE fp32 gives ~1e-6.
    h, w, y, b, ups = make_linear_logprob(
        515, 1024, 4099, dtype=FP32, bias=True, ignore_frac=0.2, **GPU
    )
    truth = lp_run("reference", d64(h), d64(w), y, d64(b), ups)
    got = lp_run("triton", h, w, y, b, ups)
    for name, g, t in zip(LP_NAMES, got, truth, strict=True):
        assert_close(g, t, rtol=2e-5, name=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_logprob_minus_inf_bias_masks_whole_splits(dtype):
    """A -inf bias over the leading 60 % of the vocabulary (whole vocabulary splits of the
    few-row forward, whole tiles of the backward): the masked entries count as probability
    0, as in the reference (an online max of -inf used to give NaN everywhere)."""
    N, H, V = 67, 512, 20011
    g = torch.Generator().manual_seed(5)
    h = torch.randn(N, H, generator=g, dtype=F64)
    w = torch.randn(V, H, generator=g, dtype=F64) * (2.0 / H**0.5)
    b = torch.randn(V, generator=g, dtype=F64)
    b[: 3 * V // 5] = float("-inf")
    y = torch.randint(3 * V // 5, V, (N,), generator=g)
    ups = [torch.rand(N, generator=g, dtype=F64), torch.rand(N, generator=g, dtype=F64)]
    h, w, b, ups = gpu(h, dtype), gpu(w, dtype), gpu(b, dtype), [gpu(u) for u in ups]
    y = gpu(y)

    def run(impl, *xs):
        hh, ww, bb = leaves(*xs)
        lp, lse, _ = rk.linear_logprob(hh, ww, y, bias=bb, impl=impl, return_stats=True)
        ((lp * ups[0].to(lp.dtype)).sum() + (lse * ups[1].to(lse.dtype)).sum()).backward()
        return [lp, lse, hh.grad, ww.grad, bb.grad]

    got = run("triton", h, w, b)
    truth = run("reference", d64(h), d64(w), d64(b))
    tol = dict(rtol=2e-5, atol=1e-5) if dtype == FP32 else dict(rtol=2e-2, atol=2e-2)
    for name, x, t in zip(("lp", "lse", "d_hidden", "d_weight", "d_bias"), got, truth, strict=True):
        assert torch.isfinite(x).all(), f"{name} is not finite"
        assert_close(x.double(), t, **tol, name=name)


def test_linear_logprob_outputs_fully_written():
    h, w, y, b, ups = make_linear_logprob(
        777, 320, 5003, dtype=BF16, bias=True, ignore_frac=0.2, **GPU
    )
    plain, truth = lp_plain_and_truth(h, w, y, b, ups, 15.0)
    with nan_filled_empty():
        got = lp_run("triton", h, w, y, b, ups, 15.0)
    check_rule(LP_NAMES, got, plain, truth, BF16)


LP_SHARED_SHAPE = (3, 5, 67, 384, 6007)  # B, K, T, H, V


def test_linear_logprob_shared_target_layout():
    """``target [B, 1, T]`` shared by K documents (what rag_loss passes): no K-fold copy."""
    B, K, T, H, V = LP_SHARED_SHAPE
    g = torch.Generator().manual_seed(1)
    h = gpu(torch.randn(B, K, T, H, generator=g, dtype=F64), BF16)
    w = gpu(torch.randn(V, H, generator=g, dtype=F64) * 2 / H**0.5, BF16)
    y = torch.randint(0, V, (B, 1, T), generator=g)
    y[:, :, :5] = IGN
    y, up = y.to(DEV), gpu(torch.rand(B, K, T, generator=g, dtype=F64))
    h[(y == IGN).expand(B, K, T)] = float("nan")

    def run(impl, hh, ww):
        hh, ww = leaves(hh, ww)
        lp = rk.linear_logprob(hh, ww, y, impl=impl)
        (lp * up.to(lp.dtype)).sum().backward()
        return [lp, hh.grad, ww.grad]

    names = ("lp", "d_hidden", "d_weight")
    check_rule(
        names, run("triton", h, w), run("reference", h, w), run("reference", d64(h), d64(w)), BF16
    )


@pytest.mark.parametrize(
    "softcap", [pytest.param(None, id="plain"), pytest.param(25.0, id="softcap")]
)
@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("dtype", [pytest.param(BF16, id="bf16"), pytest.param(FP32, id="fp32")])
def test_linear_logprob_every_autotune_config(dtype, backward, softcap, monkeypatch):
    """Each config of every autotuned kernel the variant runs, forced in turn (a benchmark may
    pick any of them), at a shape that spans several tiles of the largest ones, with an H
    tail, vocab splits, bias, the statistics' gradients and ignored rows; without and with
    softcap (which has autotuners and 16-bit config lists of its own)."""
    kw = select_backward(backward, rk.linear_logprob, monkeypatch)
    h, w, y, b, ups = make_linear_logprob(
        777, 200, 2100, dtype=dtype, bias=True, ignore_frac=0.2, **GPU
    )
    plain, truth = lp_plain_and_truth(h, w, y, b, ups, softcap)
    run = lambda: lp_run("triton", h, w, y, b, ups, softcap, **kw)
    _every_config("linear_logprob", run, LP_NAMES, plain, truth, dtype)


def _every_config(op, run, names, plain, truth, dtype):
    tuners = autotuners(op)
    if not tuners:
        pytest.skip(f"{op}'s Triton module has no triton.autotune kernel (one fixed config, "
                    "which every other test of this file runs)")  # fmt: skip
    run()  # tune every kernel once; then force one config of one kernel at a time
    failures, checked, unused = [], 0, []
    for name, tuner in tuners:
        saved = tuner.configs
        try:
            for i, cfg in enumerate(saved):
                tuner.configs = [cfg]
                tuner.best_config = None
                try:
                    got = run()
                except Exception as exc:  # a config that does not compile or launch
                    failures.append(f"{name} config {i} ({cfg}): {type(exc).__name__}: {exc}")
                    continue
                if tuner.best_config is not cfg:  # this kernel does not run for this dtype
                    unused.append(name)
                    break
                checked += 1
                try:
                    check_rule(names, got, plain, truth, dtype, what=f"{name} config {i}: ")
                except AssertionError as exc:
                    failures.append(f"{name} config {i} ({cfg}): {exc}")
        finally:
            tuner.configs = saved
    print(f"{op} {dtype_id(dtype)}: {checked} configs checked; not used here: {unused}")
    assert checked, f"no autotuned kernel of {op} ran for {dtype_id(dtype)} (unused: {unused})"
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype", [pytest.param(BF16, id="bf16"), pytest.param(FP32, id="fp32")])
def test_linear_logprob_backward_variants(dtype, monkeypatch):
    """Each backward variant within the rule; in fp32 they differ in summation order (so the
    switch took effect: bitwise-equal weight gradients would mean one variant ran twice)."""
    h, w, y, b, ups = make_linear_logprob(
        1537, 640, 20011, dtype=dtype, bias=True, ignore_frac=0.2, **GPU
    )
    plain, truth = lp_plain_and_truth(h, w, y, b, ups, 30.0)
    got = {}
    for variant in BACKWARDS:
        kw = select_backward(variant, rk.linear_logprob, monkeypatch)
        got[variant] = lp_run("triton", h, w, y, b, ups, 30.0, **kw)
        check_rule(LP_NAMES, got[variant], plain, truth, dtype, what=f"{variant}: ")
    a, b_ = (got[v][4] for v in BACKWARDS[:2])
    if dtype == FP32:  # bf16 rounding of the results can hide the different summation orders
        assert not torch.equal(a, b_), f"{BACKWARDS[:2]} gave bitwise-equal d_weight"


def test_linear_logprob_filter_eps_within_its_bound():
    """``filter_eps`` skips backward tiles whose softmax is below it everywhere: each skipped
    logit gradient is < (|g| + |g_lse|) eps, so per row |dh_r error| <= (|g_r| + |g_lse,r|)
    eps sum_v |W_v| and per vocab entry |dW_v error| <= eps sum_r (|g_r| + |g_lse,r|) |h_r|
    (triton.py), on top of bf16 rounding of the two results."""
    eps = 1e-4
    # peaked softmax (logits of std 8): most tiles fall below eps
    h, w, y, _, ups = make_linear_logprob(2048, 256, 16384, dtype=BF16, ignore_frac=0.1,
                                          wscale=8.0, device=DEV)  # fmt: skip
    ups = ups[:2]  # lp and lse: filtering never applies with a sum_logprob gradient
    exact = lp_run("triton", h, w, y, None, ups)
    got = lp_run("triton", h, w, y, None, ups, filter_eps=eps)
    keep = y != IGN
    g = (ups[0].abs() + ups[1].abs()).float() * keep
    hz = torch.where(keep[:, None], h.float(), 0.0)
    bound_dh = eps * g[:, None] * w.float().abs().sum(0)[None, :]
    bound_dw = eps * (g[:, None] * hz.abs()).sum(0)[None, :].expand(w.shape[0], -1)
    for name, a, e, bound in (("d_hidden", got[3], exact[3], bound_dh),
                              ("d_weight", got[4], exact[4], bound_dw)):  # fmt: skip
        a, e = a.float(), e.float()
        slack = bound + 2**-7 * torch.maximum(a.abs(), e.abs()) + 1e-30
        over = (a - e).abs() - slack
        assert (over <= 0).all(), f"{name}: {int((over > 0).sum())} entries beyond the bound"
    for name, a, e in zip(LP_NAMES[:3], got[:3], exact[:3], strict=True):
        assert torch.equal(a, e), f"{name}: the forward must not change with filter_eps"


@BIG
def test_linear_logprob_row_offsets_past_2_31():
    """N * H > 2^31 hidden elements: rows past the int32 range read and write their own data
    (checked on the last rows against the reference on those rows: every row's lp and dh
    depend on that row only)."""
    H, V, n_check = LP_BIG["H"], LP_BIG["V"], LP_BIG["checked"]
    N = INT32 // H + LP_BIG["extra_rows"]
    g = torch.Generator(device=DEV).manual_seed(0)
    h = torch.randn(N, H, device=DEV, dtype=BF16, generator=g)
    w = (torch.randn(V, H, device=DEV, dtype=FP32, generator=g) * 2 / H**0.5).to(BF16)
    y = torch.randint(0, V, (N,), device=DEV, generator=g)
    up = torch.rand(N, device=DEV, dtype=F64, generator=g)
    h.requires_grad_()
    lp = rk.linear_logprob(h, w, y, impl="triton")
    (lp * up.float()).sum().backward()
    rows = slice(N - n_check, N)
    got = [lp[rows].detach().clone(), h.grad[rows].clone()]
    h.grad = None
    del lp
    torch.cuda.empty_cache()

    def ref(hs, ws):
        hs, ws = leaves(hs, ws)
        out = rk.linear_logprob(hs, ws, y[rows], impl="reference")
        (out * up[rows].to(out.dtype)).sum().backward()
        return [out, hs.grad]

    hs = h.detach()[rows]
    truth = ref(hs.double(), w.double())
    plain = ref(hs, w)
    check_rule(("lp", "d_hidden"), got, plain, truth, BF16)


def test_linear_logprob_memory_does_not_scale_with_n_times_v():
    N, H, V = 8192, 1024, 65536  # N*V fp32 logits would be 2 GiB
    h, w, y, _, ups = make_linear_logprob(N, H, V, dtype=BF16, ignore_frac=0.1, **GPU)
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
    # forward: a few [splits, N] fp32 partials; backward: fp32 dh / dW buffers (or, chunked,
    # one vocabulary chunk of logit gradients) + the bf16 results: never N * V.
    assert fwd_peak < 64 * N * 4 + (8 << 20), fwd_peak
    assert bwd_peak < (V * H + N * H) * 6 + 2 * N * 64 + (256 << 20), bwd_peak
    assert bwd_peak < N * V * 4 // 2, bwd_peak
    print(f"fwd extra {fwd_peak / 2**20:.1f} MiB, fwd+bwd extra {bwd_peak / 2**20:.1f} MiB")


def _no_host_sync(fn):
    fn()  # compile / autotune (which synchronises) first
    was = value_checks_enabled()
    set_value_checks(False)  # the value checks read data on purpose (one sync per call)
    try:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        set_value_checks(was)


def test_linear_logprob_no_host_sync_after_warmup():
    h, w, y, b, ups = make_linear_logprob(
        1000, 256, 5003, dtype=BF16, bias=True, ignore_frac=0.2, **GPU
    )
    _no_host_sync(lambda: lp_run("triton", h, w, y, b, ups))


def test_linear_logprob_matches_cut_cross_entropy():
    cce = pytest.importorskip("cut_cross_entropy")
    N, H, V = 4093, 2048, 32003
    h, w, y, _, ups = make_linear_logprob(N, H, V, dtype=BF16, ignore_frac=0.15, **GPU)
    h = torch.where((y == IGN)[:, None], torch.zeros((), dtype=h.dtype, device=h.device), h)
    keep = y != IGN

    def grads(fn, dtype=BF16):
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
    want = grads(lambda hh, ww: rk.linear_logprob(hh, ww, y, impl="reference"), F64)
    for name, o, t, wt in zip(("lp", "d_hidden", "d_weight"), ours, theirs, want, strict=True):
        if name == "lp":
            o, t, wt = o[keep], t[keep], wt[keep]
        c = assert_close(o, wt, ref=t, rtol=1e-3, name=f"{name} (ref: Cut Cross-Entropy)")
        print(f"{name}: ours {c.err:.3g}, cce {c.ref_err:.3g}")


# ----------------------------------------------------------------------------- token smoothing

TS_NAMES = ("out", "lp", "d_hidden", "d_weight", "d_scores", "d_bias")
TS_CASES = {
    # shape (B, K, T, H, V), bias, softcap, masked documents, with the target log-probs
    "B3K5T37H300V5003_bias_softcap_mask_target": ((3, 5, 37, 300, 5003), True, 20.0, True, True),
    "B2K8T64H1024V32000": ((2, 8, 64, 1024, 32000), False, None, False, False),
    "B1K3T129H257V1031_mask": ((1, 3, 129, 257, 1031), False, None, True, False),
    "B2K4T33H512V8191_target": ((2, 4, 33, 512, 8191), False, None, False, True),
    # the wide tiles past 64 documents (128 and 256 rows; K = 256 = MAX_DOCS)
    "B1K100T5H256V3001_bias_softcap_mask_target": ((1, 100, 5, 256, 3001), True, 20.0, True, True),
    "B1K256T2H128V1024_target": ((1, 256, 2, 128, 1024), False, None, False, True),
}


def ts_inputs(shape, dtype, bias, mask, target, seed=0):
    """GPU inputs in ``dtype`` (scores fp32): masked documents' hidden states NaN and their
    scores a finite 1e4 (what the op must ignore), ignored target positions' hidden NaN."""
    B, K, T, H, V = shape
    h, w, s, b, dm = make_token_smoothing(
        *shape, bias=bias, doc_mask=True if mask else False, sscale=2.0, seed=seed
    )
    g = torch.Generator().manual_seed(seed + 1)
    y = None
    if target:
        y = torch.randint(0, V, (B, T), generator=g)
        y[:, : max(1, T // 8)] = IGN
        y[-1, -1] = IGN
    h = h.to(dtype)
    if dm is not None:
        h[~dm] = float("nan")
        s = torch.where(dm, s, torch.full_like(s, 1e4))
    if y is not None:
        h[(y == IGN)[:, None, :].expand(B, K, T)] = float("nan")
    up_out = torch.rand(B, T, generator=g, dtype=F64)
    up_out[0, 1] = 0.0
    up_lp = torch.rand(B, K, T, generator=g, dtype=F64) * 2 - 0.5
    return [gpu(h), gpu(w, dtype), gpu(s, FP32), gpu(b, dtype), gpu(dm), gpu(y), gpu(up_out),
            gpu(up_lp)]  # fmt: skip


def ts_run(impl, h, w, s, b, dm, y, up_out, up_lp, softcap, **kw):
    h, w, s, b = leaves(h, w, s, b)
    if y is None:
        out = rk.token_smoothing(h, w, s, bias=b, softcap=softcap, doc_mask=dm, impl=impl, **kw)
        lp = None
        loss = (out * up_out.to(out.dtype)).sum()
    else:
        out, lp = token_smoothing_with_logprob(
            h, w, s, y, bias=b, softcap=softcap, doc_mask=dm, impl=impl, **kw
        )
        loss = (out * up_out.to(out.dtype)).sum() + (lp * up_lp.to(lp.dtype)).sum()
    loss.backward()
    return [out, lp, h.grad, w.grad, s.grad, None if b is None else b.grad]


def ts_plain_and_truth(h, w, s, b, dm, y, up_out, up_lp, softcap):
    plain = ts_run("reference", h, w, s, b, dm, y, up_out, up_lp, softcap)
    truth = ts_run("reference", d64(h), d64(w), d64(s), d64(b), dm, y, up_out, up_lp, softcap)
    return plain, truth


def ts_check(inputs, softcap, dtype, what=""):
    plain, truth = ts_plain_and_truth(*inputs, softcap)
    got = ts_run("triton", *inputs, softcap)
    check_rule(TS_NAMES, got, plain, truth, dtype, what=what)
    dm, y = inputs[4], inputs[5]
    if dm is not None:
        assert (got[2][~dm] == 0).all(), "masked documents got a hidden gradient"
    if y is not None:
        assert (got[2].transpose(1, 2)[y == IGN] == 0).all(), "ignored positions got a gradient"
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(TS_CASES), ids=list(TS_CASES))
def test_token_smoothing(case, dtype):
    shape, bias, softcap, mask, target = TS_CASES[case]
    ts_check(ts_inputs(shape, dtype, bias, mask, target), softcap, dtype)


def test_token_smoothing_outputs_fully_written():
    inputs = ts_inputs((2, 3, 21, 200, 3001), BF16, True, True, True)
    plain, truth = ts_plain_and_truth(*inputs, 10.0)
    with nan_filled_empty():
        got = ts_run("triton", *inputs, 10.0)
    check_rule(TS_NAMES, got, plain, truth, BF16)


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_token_smoothing_every_autotune_config(dtype, backward, monkeypatch):
    kw = select_backward(backward, token_smoothing_with_logprob, monkeypatch)
    inputs = ts_inputs((2, 5, 37, 200, 2100), dtype, True, True, True)
    plain, truth = ts_plain_and_truth(*inputs, 25.0)
    run = lambda: ts_run("triton", *inputs, 25.0, **kw)
    _every_config("token_smoothing", run, TS_NAMES, plain, truth, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_smoothing_backward_variants(dtype, monkeypatch):
    inputs = ts_inputs((3, 4, 41, 384, 7001), dtype, True, True, True)
    plain, truth = ts_plain_and_truth(*inputs, 20.0)
    got = {}
    for variant in BACKWARDS:
        kw = select_backward(variant, token_smoothing_with_logprob, monkeypatch)
        got[variant] = ts_run("triton", *inputs, 20.0, **kw)
        check_rule(TS_NAMES, got[variant], plain, truth, dtype, what=f"{variant}: ")
    a, b = (got[v][3] for v in BACKWARDS[:2])
    if dtype == FP32:  # bf16 rounding of the results can hide the different summation orders
        assert not torch.equal(a, b), f"{BACKWARDS[:2]} gave bitwise-equal d_weight"


@BIG
def test_token_smoothing_row_offsets_past_2_31():
    """B * K * T * H > 2^31: positions past the int32 range (the last ones, checked against
    the reference on those positions: each (b, t) depends on its own rows only)."""
    B, K, H, V, n_check = 1, TS_BIG["K"], TS_BIG["H"], TS_BIG["V"], TS_BIG["checked"]
    T = INT32 // (K * H) + TS_BIG["extra_positions"]
    g = torch.Generator(device=DEV).manual_seed(0)
    h = torch.randn(B, K, T, H, device=DEV, dtype=BF16, generator=g)
    w = (torch.randn(V, H, device=DEV, dtype=FP32, generator=g) * 2 / H**0.5).to(BF16)
    s = torch.randn(B, K, device=DEV, dtype=FP32, generator=g)
    y = torch.randint(0, V, (B, T), device=DEV, generator=g)
    up_out = torch.rand(B, T, device=DEV, dtype=F64, generator=g)
    up_lp = torch.rand(B, K, T, device=DEV, dtype=F64, generator=g)
    h.requires_grad_()
    out, lp = token_smoothing_with_logprob(h, w, s, y, impl="triton")
    ((out * up_out.float()).sum() + (lp * up_lp.float()).sum()).backward()
    t = slice(T - n_check, T)
    got = [out[:, t].detach().clone(), lp[:, :, t].detach().clone(), h.grad[:, :, t].clone()]
    h.grad = None
    del out, lp
    torch.cuda.empty_cache()

    def ref(hs, ws, sc):
        hs, ws, sc = leaves(hs, ws, sc)
        o, l = token_smoothing_with_logprob(hs, ws, sc, y[:, t], impl="reference")
        ((o * up_out[:, t].to(o.dtype)).sum() + (l * up_lp[:, :, t].to(l.dtype)).sum()).backward()
        return [o, l, hs.grad]

    hs = h.detach()[:, :, t].contiguous()
    plain, truth = ref(hs, w, s), ref(hs.double(), w.double(), s.double())
    check_rule(("out", "lp", "d_hidden"), got, plain, truth, BF16)


# ----------------------------------------------------------------------------- marginalisation

MG_NAMES = ("loss", "d_token_logprobs", "d_doc_scores")
MG_SHAPES = {"B37K7T1100_masks": ((37, 7, 1100), True), "B5K64T33_docmask": ((5, 64, 33), False)}
MG_DTYPES = [*DTYPES, pytest.param(F64, id="fp64")]


def mg_inputs(shape, dtype, token_mask):
    lp, s, tm, dm = make_marginalize(*shape, dtype=F64)
    lp = lp.clone()
    lp[~dm] = float("nan")  # masked documents and tokens: never read
    if token_mask:
        lp[(~tm)[:, None, :].expand_as(lp)] = float("nan")
    s = torch.where(dm, s, torch.full_like(s, -1e4))
    up = torch.rand(lp.shape[0], dtype=F64) + 0.1
    return [gpu(lp, dtype), gpu(s, dtype), gpu(tm) if token_mask else None, gpu(dm), gpu(up)]


def mg_run(impl, lp, s, tm, dm, up, mode):
    lp, s = leaves(lp, s)
    fn = rk.rag_sequence_loss if mode == "sequence" else rk.rag_token_loss
    loss = fn(lp, s, token_mask=tm, doc_mask=dm, reduction="none", impl=impl)
    (loss * up.to(loss.dtype)).sum().backward()
    return [loss, lp.grad, s.grad]


def mg_plain_and_truth(lp, s, tm, dm, up, mode):
    return mg_run("reference", lp, s, tm, dm, up, mode), mg_run(
        "reference", d64(lp), d64(s), tm, dm, up, mode
    )


@pytest.mark.parametrize("dtype", MG_DTYPES)
@pytest.mark.parametrize("mode", ["sequence", "token"])
@pytest.mark.parametrize("case", list(MG_SHAPES), ids=list(MG_SHAPES))
def test_marginalize(case, mode, dtype):
    shape, token_mask = MG_SHAPES[case]
    inputs = mg_inputs(shape, dtype, token_mask)
    plain, truth = mg_plain_and_truth(*inputs, mode)
    got = mg_run("triton", *inputs, mode)
    # 16-bit inputs are upcast first: the rule's plain PyTorch computes in fp32 as well
    check_rule(MG_NAMES, got, plain, truth, FP32 if dtype == BF16 else dtype)


def test_marginalize_outputs_fully_written():
    inputs = mg_inputs((9, 6, 700), FP32, True)
    for mode in ("sequence", "token"):
        plain, truth = mg_plain_and_truth(*inputs, mode)
        with nan_filled_empty():
            got = mg_run("triton", *inputs, mode)
        check_rule(MG_NAMES, got, plain, truth, FP32, what=f"{mode}: ")


def test_marginalize_every_autotune_config():
    inputs = mg_inputs((37, 7, 1100), FP32, True)
    plain, truth = mg_plain_and_truth(*inputs, "token")
    run = lambda: mg_run("triton", *inputs, "token")
    _every_config("marginalize", run, MG_NAMES, plain, truth, FP32)


# ----------------------------------------------------------------------------- contrastive

CON_NAMES = ("loss", "d_queries", "d_docs", "d_scale")
CON_CASES = {
    "cos_pairs_B1000M3001D768": dict(B=1000, M=3001, D=768),
    "cos_hardneg_ids_B333M2000D100": dict(B=333, M=2000, D=100, doc_ids=True),
    "dot_index_B512M1500D64": dict(B=512, M=1500, D=64, similarity="dot", scale=1.0,
                                   positives="index"),
    "symmetric_B700M1400D384": dict(B=700, M=1400, D=384, symmetric=True),
    "symmetric_ids_index_B300M900D128": dict(B=300, M=900, D=128, symmetric=True, doc_ids=True,
                                             positives="index"),
    "multi_pos_B400M1200D96": dict(B=400, M=1200, D=96, positives="mask", p_pos=0.01),
    "multi_pos_ids_B257M1031D200": dict(B=257, M=1031, D=200, positives="mask", doc_ids=True,
                                        p_pos=0.01),
}  # fmt: skip


def con_inputs(case: dict, dtype, seed=0):
    kw = dict(case)
    B, M, D = kw.pop("B"), kw.pop("M"), kw.pop("D")
    scale = kw.pop("scale", 20.0)
    q, d, pos, ids, w = make_contrastive(
        B, M, D, positives=kw.pop("positives", None), doc_ids=kw.pop("doc_ids", False),
        p_pos=kw.pop("p_pos", 0.15), seed=seed,
    )  # fmt: skip
    opts = dict(positives=gpu(pos), doc_ids=gpu(ids), **kw)
    s = torch.tensor(scale, dtype=FP32)
    return [gpu(q, dtype), gpu(d, dtype), gpu(s), gpu(w)], opts


def plain_contrastive(q, d, s, positives=None, similarity="cos", symmetric=False, doc_ids=None):
    """What plain PyTorch computes in ``q``'s dtype: the embeddings normalised (fp32) and
    rounded to that dtype, one score matmul in it (bf16 scores, as a bf16 model's
    ``q @ d.T`` gives), softmax statistics in fp32 (a [1, 1] fp32 scale promotes the scores;
    a 0-d one would not). Same masking semantics as the reference (it is the reference)."""
    qn = similarity_inputs(q.float(), similarity).to(q.dtype)
    dn = similarity_inputs(d.float(), similarity).to(d.dtype)
    pos_index = pos_mask = None
    if positives is None:
        pos_index = torch.arange(q.shape[0], device=q.device)
    elif positives.dtype == torch.bool:
        pos_mask = positives
    else:
        pos_index = positives
    return contrastive_loss_reference(
        qn, dn, s.float().reshape(1, 1), similarity="dot", pos_index=pos_index,
        pos_mask=pos_mask, cand_ids=doc_ids, symmetric=symmetric,
    )  # fmt: skip


def con_run(impl, q, d, s, up, opts):
    q, d, s = leaves(q, d, s)
    if impl == "plain":
        loss = plain_contrastive(q, d, s, **opts)
    else:
        loss = rk.contrastive_loss(q, d, scale=s, reduction="none", impl=impl, **opts)
    (loss * up.to(loss.dtype)).sum().backward()
    return [loss, q.grad, d.grad, s.grad]


def con_plain_and_truth(q, d, s, up, opts):
    plain = con_run("plain", q, d, s, up, opts)
    truth = con_run("reference", d64(q), d64(d), d64(s), up, opts)
    return plain, truth


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CON_CASES), ids=list(CON_CASES))
def test_contrastive(case, dtype):
    inputs, opts = con_inputs(CON_CASES[case], dtype)
    plain, truth = con_plain_and_truth(*inputs, opts)
    got = con_run("triton", *inputs, opts)
    check_rule(CON_NAMES, got, plain, truth, dtype)


def test_contrastive_outputs_fully_written():
    inputs, opts = con_inputs(CON_CASES["symmetric_ids_index_B300M900D128"], BF16)
    plain, truth = con_plain_and_truth(*inputs, opts)
    with nan_filled_empty():
        got = con_run("triton", *inputs, opts)
    check_rule(CON_NAMES, got, plain, truth, BF16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_contrastive_every_autotune_config(dtype):
    inputs, opts = con_inputs(CON_CASES["symmetric_ids_index_B300M900D128"], dtype)
    plain, truth = con_plain_and_truth(*inputs, opts)
    run = lambda: con_run("triton", *inputs, opts)
    _every_config("contrastive", run, CON_NAMES, plain, truth, dtype)


def _rows_check(q, d, s, up, opts, rows, got, names):
    """Reference on the query rows ``rows`` only (the row-direction loss and dq of a query
    depend on that query alone): fp32 truth, bf16 plain PyTorch."""
    sub = dict(opts)
    if sub.get("positives") is not None:
        sub["positives"] = sub["positives"][rows]
    plain = con_run("plain", q[rows], d, s, up[rows], sub)
    truth = con_run("reference", q[rows].float(), d.float(), s, up[rows], sub)
    check_rule(names, got, plain[: len(names)], truth[: len(names)], BF16)


@BIG
def test_contrastive_mask_offsets_past_2_31():
    """``[B, M]`` positives mask and ``[B, U]`` id table with B * M, B * U > 2^31 (int64
    offsets in the mask mode), last queries checked."""
    B, M, D, n_check = (CON_BIG_MASK[k] for k in ("B", "M", "D", "checked"))
    dup = CON_BIG_MASK["duplicates"]
    assert B * (M - dup) > INT32  # the [B, U] id table too
    g = torch.Generator(device=DEV).manual_seed(0)
    q = torch.randn(B, D, device=DEV, dtype=BF16, generator=g)
    d = torch.randn(M, D, device=DEV, dtype=BF16, generator=g)
    pos = torch.zeros(B, M, dtype=torch.bool, device=DEV)
    pos[torch.arange(B, device=DEV), torch.randint(0, M, (B,), device=DEV, generator=g)] = True
    pos[torch.arange(B, device=DEV), torch.randint(0, M, (B,), device=DEV, generator=g)] = True
    ids = torch.arange(M, device=DEV)
    ids[-dup:] = ids[-2 * dup : -dup]  # duplicates: false negatives to exclude; U = M - dup
    s = torch.tensor(20.0, device=DEV)
    up = torch.rand(B, device=DEV, dtype=F64, generator=g)
    opts = dict(positives=pos, doc_ids=ids)
    got = con_run("triton", q, d, s, up, opts)
    rows = torch.arange(B - n_check, B, device=DEV)
    _rows_check(q, d, s, up, opts, rows, [got[0][rows], got[1][rows]], CON_NAMES[:2])


@BIG
def test_contrastive_candidate_offsets_past_2_31():
    """M * D > 2^31 candidate elements (about 2.8 M candidates x 768): the candidates past the
    int32 range are scored and get their gradients."""
    B, D = CON_BIG_D["B"], CON_BIG_D["D"]
    M = INT32 // D + CON_BIG_D["extra_candidates"]
    g = torch.Generator(device=DEV).manual_seed(0)
    q = torch.randn(B, D, device=DEV, dtype=BF16, generator=g)
    d = torch.randn(M, D, device=DEV, dtype=BF16, generator=g)
    n_check = CON_BIG_D["checked"]
    pos = torch.randint(M - n_check, M, (B,), device=DEV, generator=g)  # past INT32 elements
    s = torch.tensor(20.0, device=DEV)
    up = torch.rand(B, device=DEV, dtype=F64, generator=g)
    opts = dict(positives=pos)
    loss, dq, dd, ds = con_run("triton", q, d, s, up, opts)
    tail = slice(M - n_check, M)
    plain = con_run("plain", q, d, s, up, opts)
    truth = con_run("reference", q.float(), d.float(), s, up, opts)
    pick = lambda r: [r[0], r[1], r[2][tail], r[2][pos], r[3]]
    names = ("loss", "d_queries", "d_docs[tail]", "d_docs[positives]", "d_scale")
    check_rule(names, pick([loss, dq, dd, ds]), pick(plain), pick(truth), BF16)


def contrastive_memory_bound(B: int, M: int, D: int) -> float:
    """Bytes of extra memory the fused contrastive op may take: the issue's backward budget,
    max(1 % of the [B, M] fp32 scores it avoids, 256 MiB), plus 32 bytes per embedding
    element of queries and candidates (about eight fp32 arrays of that size: the fp32 and
    normalised copies, the 16-bit operands, the fp32 dq accumulator, the gradients through
    the normalisation), plus 32 MiB. benchmarks/device_check.sh applies the same bound at
    B = M = 65536, D = 768."""
    return max(0.01 * B * M * 4, 256 * 2**20) + 32 * (B + M) * D + 32 * 2**20


def test_contrastive_memory_is_linear_in_b_plus_m():
    B = M = 16384
    D = 256
    g = torch.Generator(device=DEV).manual_seed(0)
    q = torch.randn(B, D, device=DEV, dtype=BF16, generator=g).requires_grad_()
    d = torch.randn(M, D, device=DEV, dtype=BF16, generator=g).requires_grad_()
    rk.contrastive_loss(q, d, impl="triton").backward()  # compile / warm up
    q.grad = d.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    rk.contrastive_loss(q, d, impl="triton").backward()
    peak = torch.cuda.max_memory_allocated() - base
    bound = contrastive_memory_bound(B, M, D)
    scores = B * M * 4  # one fp32 [B, M] score matrix, what the naive path holds (and more)
    assert bound < scores  # the bound tells O(B + M) from O(B M) at this size
    assert peak <= bound, f"{peak / 2**20:.1f} MiB extra > {bound / 2**20:.1f} MiB"
    print(f"extra {peak / 2**20:.1f} MiB (bound {bound / 2**20:.0f} MiB, one [B, M] fp32 "
          f"matrix {scores / 2**20:.0f} MiB)")  # fmt: skip


# ----------------------------------------------------------------------------- rag_loss

RAG_NAMES = ("loss", "d_hidden", "d_weight", "d_scores", "d_bias")
RAG_SHAPE = (3, 4, 37, 256, 5003)  # B, K, T, H, V


def rag_inputs(dtype, shape=RAG_SHAPE, seed=0):
    """GPU inputs: prompt / padding positions and the masked document NaN-poisoned."""
    h, w, y, s, dm = make_rag(*shape, seed=seed)
    B, K, T, _ = h.shape
    V = w.shape[0]
    g = torch.Generator().manual_seed(seed + 7)
    b = torch.randn(V, generator=g, dtype=F64) * 0.5
    h = h.clone()
    h[~dm] = float("nan")
    h[(y == IGN)[:, None, :].expand(B, K, T)] = float("nan")
    s = torch.where(dm, s, torch.full_like(s, 1e4))
    up = torch.rand(B, generator=g, dtype=F64) + 0.1
    return [gpu(h, dtype), gpu(w, dtype), gpu(y), gpu(s, FP32), gpu(dm), gpu(b, dtype), gpu(up)]


def rag_run(impl, h, w, y, s, dm, b, up, mode, eps, softcap=20.0):
    h, w, s, b = leaves(h, w, s, b)
    loss = rk.rag_loss(h, w, y, s, mode=mode, bias=b, label_smoothing=eps, doc_mask=dm,
                       softcap=softcap, reduction="none", impl=impl)  # fmt: skip
    (loss * up.to(loss.dtype)).sum().backward()
    return [loss, h.grad, w.grad, s.grad, None if b is None else b.grad]


def rag_plain_and_truth(h, w, y, s, dm, b, up, mode, eps):
    plain = rag_run("reference", h, w, y, s, dm, b, up, mode, eps)
    truth = rag_run("reference", d64(h), d64(w), y, d64(s), dm, d64(b), up, mode, eps)
    return plain, truth


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [0.0, 0.1], ids=["eps0", "eps0.1"])
@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_rag_loss(mode, eps, dtype):
    inputs = rag_inputs(dtype)
    plain, truth = rag_plain_and_truth(*inputs, mode, eps)
    got = rag_run("triton", *inputs, mode, eps)
    check_rule(RAG_NAMES, got, plain, truth, dtype)
    dm = inputs[4]
    assert (got[1][~dm] == 0).all(), "masked documents got a hidden gradient"


def test_rag_loss_no_host_sync_after_warmup():
    inputs = rag_inputs(BF16)
    _no_host_sync(lambda: rag_run("triton", *inputs, "token", 0.1))


# ----------------------------------------------------------------------------- determinism


def _det_case(name):
    """``(run() -> tensors, names)`` for the determinism test: sizes with many programs adding
    into the same gradient rows."""
    if name.startswith("linear_logprob"):
        dtype = BF16 if name.endswith("bf16") else FP32
        h, w, y, b, ups = make_linear_logprob(
            4096, 1024, 32000, dtype=dtype, bias=True, ignore_frac=0.1, **GPU
        )
        return (lambda: lp_run("triton", h, w, y, b, ups)), LP_NAMES
    if name == "token_smoothing-bf16":
        inputs = ts_inputs((4, 8, 64, 512, 16384), BF16, True, True, True)
        return (lambda: ts_run("triton", *inputs, None)), TS_NAMES
    if name == "contrastive-bf16":
        inputs, opts = con_inputs(dict(B=4096, M=8192, D=256, symmetric=True), BF16)
        return (lambda: con_run("triton", *inputs, opts)), CON_NAMES
    if name == "rag_loss-token-eps0.1-bf16":
        inputs = rag_inputs(BF16, (4, 8, 64, 512, 16384))
        return (lambda: rag_run("triton", *inputs, "token", 0.1)), RAG_NAMES
    raise KeyError(name)


DET_CASES = ["linear_logprob-bf16", "linear_logprob-fp32", "token_smoothing-bf16",
             "contrastive-bf16", "rag_loss-token-eps0.1-bf16"]  # fmt: skip


@pytest.mark.parametrize("case", DET_CASES)
def test_default_backward_is_deterministic(case, monkeypatch):
    select_backward(None, rk.linear_logprob, monkeypatch)  # the default variant
    run, names = _det_case(case)
    first = run()
    for _ in range(2):
        assert_bitwise_equal(names, first, run(), what=f"{case}: ")
