"""Compiled C++ fused LM head (``rk.linear_logprob(impl="cpu")``) against the float64 reference.

Small tile sizes are forced (``cpu.TILE_ROWS`` / ``cpu.TILE_VOCAB``) so that small shapes still
span several row blocks and vocabulary tiles, including ragged last tiles.
"""

from __future__ import annotations

import pytest
import torch

import rag_kernels as rk
from rag_kernels.ops import registry
from toolkit import IGNORE, assert_close, make_linear_logprob

_WHY = registry.unavailable_reason("linear_logprob", "cpu")
if _WHY:
    pytest.skip(f"linear_logprob impl='cpu': {_WHY}", allow_module_level=True)

from rag_kernels.ops import _C  # noqa: E402
from rag_kernels.ops.linear_logprob import cpu as llp_cpu  # noqa: E402


@pytest.fixture(params=[llp_cpu.DEFAULT_TILES, (16, 64)], ids=["default-tiles", "tiles16x64"])
def tiles(request, monkeypatch):
    rows, vocab = request.param
    monkeypatch.setattr(llp_cpu, "TILE_ROWS", rows)
    monkeypatch.setattr(llp_cpu, "TILE_VOCAB", vocab)
    return request.param


# weight ~ N(0, 1.5^2 / H), bias ~ N(0, 0.25): logits of a realistic spread
SCALES = dict(wscale=1.5, bscale=0.5)
# what run() returns: the outputs, then the gradients
NAMES = ["lp", "lse", "sum_logprob", "grad_hidden", "grad_weight", "grad_bias"]


def upstream(N, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.rand(N, generator=gen, dtype=torch.float64) + 0.1,
        torch.randn(N, generator=gen, dtype=torch.float64),
        torch.rand(N, generator=gen, dtype=torch.float64) * 1e-3,
    )


def run(impl, h, W, y, b, *, softcap=None, stats=True, grads=None, compute_dtype=None):
    """Outputs and gradients of ``sum(g_lp lp + g_lse lse + g_S S)`` w.r.t. hidden, weight, bias."""
    if compute_dtype is not None:
        h, W = h.to(compute_dtype), W.to(compute_dtype)
        b = None if b is None else b.to(compute_dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (h, W) + ((b,) if b is not None else ())]
    hb = leaves[2] if b is not None else None
    out = rk.linear_logprob(
        leaves[0], leaves[1], y, bias=hb, softcap=softcap, impl=impl, return_stats=True
    )
    g_lp, g_lse, g_s = grads if grads is not None else upstream(y.shape[0])
    outs, gs = [out.logprob], [g_lp]
    if stats:
        outs += [out.lse, out.sum_logprob]
        gs += [g_lse, g_s]
    gs = [g.to(o.dtype) for g, o in zip(gs, outs, strict=True)]
    got = torch.autograd.grad(outs, leaves, gs)
    return [o.detach() for o in out], list(got)


SHAPES = [(37, 50, 1031), (70, 24, 333)]
SHAPE_IDS = ["N37-H50-V1031", "N70-H24-V333"]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("softcap", [None, 4.5], ids=["nocap", "cap4.5"])
@pytest.mark.parametrize("stats", [False, True], ids=["lp-only", "stats"])
def test_fp32_matches_float64_reference(tiles, shape, bias, softcap, stats):
    N, H, V = shape
    h, W, y, b, _ = make_linear_logprob(
        N, H, V, dtype=torch.float32, bias=bias, n_ignore=5, **SCALES
    )
    outs, grads = run("cpu", h, W, y, b, softcap=softcap, stats=stats)
    ref_outs, ref_grads = run(
        "reference", h, W, y, b, softcap=softcap, stats=stats, compute_dtype=torch.float64
    )
    # |a - e| <= 1e-5 (|e| + 0.1 max|e| + 1e-12): relative, with a floor for near-zero entries
    tol = dict(elem_rtol=1e-5, rtol=1e-6, atol=1e-17)
    for name, a, e in zip(["lp", "lse", "sum_logprob"], outs, ref_outs, strict=False):
        assert a.dtype == torch.float32
        assert_close(a, e, **tol, name=name)
    for name, a, e in zip(
        ["grad_hidden", "grad_weight", "grad_bias"], grads, ref_grads, strict=False
    ):
        assert a.dtype == torch.float32
        assert_close(a, e, **tol, name=name)
    ignored = y == IGNORE
    assert (outs[0][ignored] == 0).all() and (grads[0][ignored] == 0).all()


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["nocap", "cap3"])
def test_fp64_matches_reference_tightly(tiles, bias, softcap):
    h, W, y, b, _ = make_linear_logprob(
        41, 19, 517, dtype=torch.float64, bias=bias, n_ignore=4, **SCALES
    )
    outs, grads = run("cpu", h, W, y, b, softcap=softcap)
    ref_outs, ref_grads = run("reference", h, W, y, b, softcap=softcap)
    for a, e in zip(outs + grads, ref_outs + ref_grads, strict=True):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10 * float(e.abs().max()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("softcap", [None, 6.0], ids=["nocap", "cap6"])
def test_low_precision_error_within_2x_of_pytorch(tiles, dtype, bias, softcap):
    h, W, y, b, _ = make_linear_logprob(45, 64, 700, dtype=dtype, bias=bias, n_ignore=3, **SCALES)
    outs, grads = run("cpu", h, W, y, b, softcap=softcap)
    base_outs, base_grads = run("reference", h, W, y, b, softcap=softcap)
    true_outs, true_grads = run(
        "reference", h, W, y, b, softcap=softcap, compute_dtype=torch.float64
    )
    assert all(o.dtype == torch.float32 for o in outs)
    assert [g.dtype for g in grads] == [dtype] * len(grads)
    for name, a, base, truth in zip(
        NAMES, outs + grads, base_outs + base_grads, true_outs + true_grads, strict=False
    ):
        assert not torch.isnan(a).any(), name
        assert_close(a, truth, ref=base, rtol=1e-3, atol=1e-6, name=name)


BF16_SHAPES = [(45, 64, 700), (38, 63, 517)]  # an odd H pads the bf16 GEMMs' K pairs
BF16_IDS = ["N45-H64-V700", "N38-H63-V517"]


@pytest.mark.parametrize("shape", BF16_SHAPES, ids=BF16_IDS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("softcap", [None, 6.0], ids=["nocap", "cap6"])
def test_bf16_error_within_2x_of_materialising_bf16(bf16_path, tiles, shape, bias, softcap):
    """Both bf16 paths against the float64 truth on the same (bf16-rounded) inputs, within 2x
    the error of plain PyTorch's ``(h @ W.T).float()`` + log-softmax (the reference in bf16)."""
    h, W, y, b, _ = make_linear_logprob(
        *shape, dtype=torch.bfloat16, bias=bias, n_ignore=3, wscale=3.0, bscale=0.5
    )
    outs, grads = run("cpu", h, W, y, b, softcap=softcap)
    base_outs, base_grads = run("reference", h, W, y, b, softcap=softcap)
    true_outs, true_grads = run(
        "reference", h, W, y, b, softcap=softcap, compute_dtype=torch.float64
    )
    assert all(o.dtype == torch.float32 for o in outs)
    assert [g.dtype for g in grads] == [torch.bfloat16] * len(grads)
    for name, a, base, truth in zip(
        NAMES, outs + grads, base_outs + base_grads, true_outs + true_grads, strict=False
    ):
        assert_close(a, truth, ref=base, rtol=1e-3, atol=1e-6, name=f"{bf16_path} {name}")


def assert_is_the_fp32_kernel(outs, grads, f32_outs, f32_grads, what):
    """A bf16 run's outputs and gradients are the fp32 kernel's on the upcast values, the
    gradients rounded to bf16 once (db: float64 sums rounded to bf16 directly vs through fp32,
    one bf16 ulp at most)."""
    for name, a, e in zip(NAMES[:5], outs + grads[:2], f32_outs + f32_grads[:2], strict=True):
        assert torch.equal(a, e.to(a.dtype)), f"{what} {name}"
    torch.testing.assert_close(grads[2].float(), f32_grads[2], rtol=2**-8, atol=0)


def test_bf16_paths_differ_and_converted_is_the_fp32_kernel(tiles):
    """Without native bf16 GEMMs a bf16 input runs exactly the fp32 kernel on its upcast values
    (gradients rounded to bf16 once), on every fp32 GEMM path (ATen's, the AVX2 kernel,
    oneDNN's); the native path is a different computation (bf16 GEMMs, bf16-rounded dz)."""
    h, W, y, b, _ = make_linear_logprob(
        41, 37, 611, dtype=torch.bfloat16, bias=True, n_ignore=3, **SCALES
    )
    isa, gemm = _C.cpu_isa(), _C.cpu_gemm()
    converted = {}
    try:
        for mode, setup in [("aten", lambda: _C.set_cpu_gemm("aten")),
                            ("avx2", lambda: _C.set_cpu_isa("avx2")),
                            ("onednn", lambda: _C.set_cpu_gemm("fp32"))]:  # fmt: skip
            setup()
            if _C.fp32_gemm() != mode:
                _C.set_cpu_isa(isa)
                _C.set_cpu_gemm(gemm)
                continue
            outs, grads = run("cpu", h, W, y, b)
            f32_outs, f32_grads = run("cpu", h.float(), W.float(), y, b.float())
            _C.set_cpu_isa(isa)
            _C.set_cpu_gemm(gemm)
            assert_is_the_fp32_kernel(outs, grads, f32_outs, f32_grads, mode)
            converted[mode] = grads
        if _C.native_bf16_gemm():
            _, nat_grads = run("cpu", h, W, y, b)
            for grads in converted.values():
                assert not torch.equal(nat_grads[0], grads[0])
                assert not torch.equal(nat_grads[1], grads[1])
    finally:
        _C.set_cpu_isa(isa)
        _C.set_cpu_gemm(gemm)


def _isas():
    order = ["default", "avx2", "avx512"]
    return order[: order.index(_C.detected_isa()) + 1]


# fp32 GEMM kernels of each ISA setting (csrc/micro_gemm.h: on AVX-512 the AVX2 kernel only
# where oneDNN's micro-kernel is missing from the torch build); "-aten": set_cpu_gemm("aten")
FP32_GEMM = {"default": ("aten",), "avx2": ("avx2",), "avx512": ("onednn", "avx2")}


@pytest.mark.parametrize("isa", ["default", "avx2", "avx2-aten", "avx512", "avx512-aten"])
@pytest.mark.parametrize("softcap", [None, 4.5], ids=["nocap", "cap4.5"])
def test_every_epilogue_isa_matches_float64(tiles, isa, softcap):
    """Each compiled version of the epilogue (csrc/vec_math.h RK_ISA_VARIANTS) that this CPU
    can run, selected with set_cpu_isa as RAG_KERNELS_CPU_ISA would, with that ISA's fp32
    micro-kernel GEMMs (oneDNN's on AVX-512, the AVX2 kernel on AVX2) and (``-aten``) with
    ATen's."""
    name = isa.removesuffix("-aten")
    if name not in _isas():
        pytest.skip(f"this CPU runs {_isas()}, not {name}")
    h, W, y, b, _ = make_linear_logprob(
        37, 50, 1031, dtype=torch.float32, bias=True, n_ignore=5, **SCALES
    )
    prev, gemm = _C.cpu_isa(), _C.cpu_gemm()
    try:
        _C.set_cpu_isa(name)
        _C.set_cpu_gemm("aten" if isa.endswith("-aten") else "auto")
        assert _C.cpu_isa() == name
        assert _C.fp32_gemm() in (("aten",) if isa.endswith("-aten") else FP32_GEMM[name])
        outs, grads = run("cpu", h, W, y, b, softcap=softcap)
    finally:
        _C.set_cpu_isa(prev)
        _C.set_cpu_gemm(gemm)
    ref_outs, ref_grads = run("reference", h, W, y, b, softcap=softcap, compute_dtype=torch.float64)
    tol = dict(elem_rtol=1e-5, rtol=1e-6, atol=1e-17)
    for name, a, e in zip(NAMES, outs + grads, ref_outs + ref_grads, strict=True):
        assert_close(a, e, **tol, name=f"{isa} {name}")


# (N, H, V, row tile, vocabulary tile): row blocks (the M of logits and dh) and vocabulary tiles
# (the M of dW) that leave 1 .. 5 rows after the 6-row runs, strips of 16 columns cut to
# 1 .. 15 (masked), K = H as small as 1, the gradient GEMMs' K (rows of a block, columns of a
# tile) odd, and one block / tile covering everything.
AVX2_SHAPES = [
    pytest.param(1, 1, 17, 0, 0, id="N1-H1-V17"),
    pytest.param(15, 8, 33, 0, 0, id="N15-H8-V33"),
    pytest.param(11, 3, 130, 5, 48, id="N11-H3-V130-t5x48"),
    pytest.param(40, 19, 1000, 13, 200, id="N40-H19-V1000-t13x200"),
    pytest.param(64, 72, 640, 64, 320, id="N64-H72-V640-t64x320"),
    pytest.param(250, 33, 997, 256, 512, id="N250-H33-V997-t256x512"),
    pytest.param(9, 130, 71, 4, 71, id="N9-H130-V71-t4x71"),
]


@pytest.mark.parametrize("N, H, V, row_tile, vocab_tile", AVX2_SHAPES)
def test_avx2_gemm_odd_shapes_match_float64(monkeypatch, N, H, V, row_tile, vocab_tile):
    """The AVX2 fp32 micro-kernel (csrc/avx2_gemm.h: 6 x 16 register blocks, masked ragged
    strips) in all three of its GEMMs (logits, dh += dz W, dW = dz^T h) against float64, fp32
    and bf16 inputs (converted while packing), with bias and softcap."""
    if "avx2" not in _isas():
        pytest.skip(f"this CPU runs {_isas()}")
    monkeypatch.setattr(llp_cpu, "TILE_ROWS", row_tile)
    monkeypatch.setattr(llp_cpu, "TILE_VOCAB", vocab_tile)
    h, W, y, b, _ = make_linear_logprob(N, H, V, dtype=torch.float32, bias=True, **SCALES)
    prev, gemm = _C.cpu_isa(), _C.cpu_gemm()
    try:
        _C.set_cpu_isa("avx2")
        _C.set_cpu_gemm("auto")
        assert _C.fp32_gemm() == "avx2"
        outs, grads = run("cpu", h, W, y, b, softcap=30.0)
        hb, Wb, bb = h.bfloat16(), W.bfloat16(), b.bfloat16()
        b_outs, b_grads = run("cpu", hb, Wb, y, bb, softcap=30.0)
    finally:
        _C.set_cpu_isa(prev)
        _C.set_cpu_gemm(gemm)
    ref_outs, ref_grads = run("reference", h, W, y, b, softcap=30.0, compute_dtype=torch.float64)
    bref_outs, bref_grads = run("reference", hb, Wb, y, bb, softcap=30.0,
                                compute_dtype=torch.float64)  # fmt: skip
    for name, a, e in zip(NAMES, outs + grads, ref_outs + ref_grads, strict=True):
        assert_close(a, e, elem_rtol=1e-5, rtol=1e-6, atol=1e-17, name=f"fp32 {name}")
    # bf16: the exact values of the bf16 inputs in fp32, gradients rounded to bf16 once
    for name, a, e in zip(NAMES, b_outs + b_grads, bref_outs + bref_grads, strict=True):
        tol = dict(rtol=2**-8, atol=1e-6) if name.startswith("grad") else dict(rtol=1e-5, atol=1e-5)
        assert_close(a.double(), e, **tol, name=f"bf16 {name}")


def test_a_bf16_matmul_cpu_runs_native_bf16_gemms():
    """Where the CPU has bf16 matmul (AVX512_BF16 / AMX) and oneDNN's fp32 micro-kernel runs,
    its bf16 one must pass its probe (csrc/micro_gemm.h: exact small GEMMs through the bf16
    panel packings) too: a failing probe (a broken VNNI packing, say) would otherwise send
    every bf16 input down the converted fp32 path, right but at half the speed, and the
    ``native`` tests would only skip."""
    isa, gemm = _C.cpu_isa(), _C.cpu_gemm()
    try:
        _C.set_cpu_isa("auto")
        _C.set_cpu_gemm("auto")
        if not (_C.cpu_isa() == "avx512" and _C.cpu_has_bf16_matmul()):
            pytest.skip(f"cpu_isa={_C.cpu_isa()}, bf16 matmul={_C.cpu_has_bf16_matmul()}")
        if _C.fp32_gemm() != "onednn":
            pytest.skip(f"no oneDNN micro-kernel in this torch build: {_C.fp32_gemm()}")
        assert _C.native_bf16_gemm()
    finally:
        _C.set_cpu_isa(isa)
        _C.set_cpu_gemm(gemm)


def test_onednn_disabled_runs_the_avx2_kernel(tiles):
    """With oneDNN turned off (torch.backends.mkldnn), fp32 and bf16 inputs take the AVX2
    kernel on any AVX2 CPU (AVX-512 ones included), never oneDNN's micro-kernel, and still
    match float64."""
    if "avx2" not in _isas():
        pytest.skip(f"this CPU runs {_isas()}")
    h, W, y, b, _ = make_linear_logprob(37, 50, 1031, dtype=torch.float32, bias=True, **SCALES)
    with torch.backends.mkldnn.flags(enabled=False):
        assert _C.fp32_gemm() == "avx2" and not _C.native_bf16_gemm()
        outs, grads = run("cpu", h, W, y, b)
        hb, Wb, bb = h.bfloat16(), W.bfloat16(), b.bfloat16()
        b_outs, b_grads = run("cpu", hb, Wb, y, bb)
        f32_outs, f32_grads = run("cpu", hb.float(), Wb.float(), y, bb.float())
    assert _C.fp32_gemm() in FP32_GEMM[_C.cpu_isa()]
    ref_outs, ref_grads = run("reference", h, W, y, b, compute_dtype=torch.float64)
    for name, a, e in zip(NAMES, outs + grads, ref_outs + ref_grads, strict=True):
        assert_close(a, e, elem_rtol=1e-5, rtol=1e-6, atol=1e-17, name=name)
    assert_is_the_fp32_kernel(b_outs, b_grads, f32_outs, f32_grads, "bf16")


def test_cpu_isa_override_is_checked():
    with pytest.raises(RuntimeError, match="cpu_isa must be one of"):
        _C.set_cpu_isa("avx3")
    with pytest.raises(RuntimeError, match="cpu_gemm must be one of"):
        _C.set_cpu_gemm("mkl")
    prev = _C.cpu_isa()
    _C.set_cpu_isa("avx512")  # never above what the CPU has
    assert _C.cpu_isa() == _C.detected_isa()
    _C.set_cpu_isa(prev)


def test_zero_upstream_rows_contribute_exactly_nothing(tiles):
    N, H, V = 53, 33, 401
    h, W, y, b, _ = make_linear_logprob(
        N, H, V, dtype=torch.float32, bias=True, n_ignore=4, **SCALES
    )
    g_lp, g_lse, g_s = upstream(N)
    dead = torch.zeros(N, dtype=torch.bool)
    dead[[0, 7, 8, 30, 52]] = True
    dead &= y != IGNORE
    for g in (g_lp, g_lse, g_s):
        g[dead] = 0
    h = h.clone()
    h[dead] = 1e4  # finite but extreme: any leak into dW / db would be obvious
    _, grads = run("cpu", h, W, y, b, grads=(g_lp, g_lse, g_s))
    assert (grads[0][dead] == 0).all()
    live = ~dead
    _, grads_live = run("cpu", h[live], W, y[live], b, grads=(g_lp[live], g_lse[live], g_s[live]))
    # The dead rows are compacted away before any FLOP: the live-only run is bitwise equal.
    assert torch.equal(grads[1], grads_live[1])
    assert torch.equal(grads[2], grads_live[2])
    assert torch.equal(grads[0][live], grads_live[0])


def test_only_lse_or_sum_upstream(tiles):
    """Upstream on lse / sum_logprob alone (lp unused) goes through the same kernel."""
    N, H, V = 29, 20, 300
    h, W, y, b, _ = make_linear_logprob(
        N, H, V, dtype=torch.float64, bias=True, n_ignore=2, **SCALES
    )
    for which in (1, 2):
        per = []
        for impl in ("cpu", "reference"):
            leaves = [t.clone().requires_grad_() for t in (h, W, b)]
            out = rk.linear_logprob(*leaves[:2], y, bias=leaves[2], impl=impl, return_stats=True)
            g = torch.linspace(-1, 2, N, dtype=torch.float64)
            per.append(torch.autograd.grad(out[which], leaves, g))
        for a, e in zip(*per, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-9)


def test_int32_targets_match_int64(tiles):
    h, W, y, b, _ = make_linear_logprob(
        37, 50, 1031, dtype=torch.float32, bias=True, n_ignore=3, **SCALES
    )
    outs64, grads64 = run("cpu", h, W, y, b)
    outs32, grads32 = run("cpu", h, W, y.to(torch.int32), b)
    for a, e in zip(outs32 + grads32, outs64 + grads64, strict=True):
        assert torch.equal(a, e)


def test_all_rows_ignored_gives_zeros():
    h, W, y, b, _ = make_linear_logprob(6, 8, 50, dtype=torch.float32, bias=True, **SCALES)
    y[:] = IGNORE
    outs, grads = run("cpu", h, W, y, b)
    for t in outs + grads:
        assert not torch.isnan(t).any() and (t == 0).all()


def test_leading_dims_and_noncontiguous_inputs():
    h, W, y, b, _ = make_linear_logprob(
        24, 30, 211, dtype=torch.float32, bias=True, n_ignore=2, poison=False, **SCALES
    )
    h3 = h.view(4, 6, 30).transpose(0, 1)  # non-contiguous [6, 4, 30]
    y3 = y.view(4, 6).t()
    Wt = W.t().contiguous().t()  # same values, column-major
    got = rk.linear_logprob(h3, Wt, y3, bias=b, impl="cpu")
    ref = rk.linear_logprob(h3.double(), Wt.double(), y3, bias=b.double(), impl="reference")
    assert got.shape == (6, 4)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("softcap", [None, 2.0], ids=["nocap", "cap2"])
def test_gradcheck_float64(monkeypatch, bias, softcap):
    monkeypatch.setattr(llp_cpu, "TILE_ROWS", 2)
    monkeypatch.setattr(llp_cpu, "TILE_VOCAB", 3)
    h, W, y, b, _ = make_linear_logprob(5, 4, 7, dtype=torch.float64, bias=bias, **SCALES)
    y[1] = IGNORE
    leaves = [h.requires_grad_(), W.requires_grad_()] + ([b.requires_grad_()] if bias else [])

    def f(*args):
        out = rk.linear_logprob(
            args[0],
            args[1],
            y,
            bias=args[2] if bias else None,
            softcap=softcap,
            impl="cpu",
            return_stats=True,
        )
        return tuple(out)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6)


def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    h, W, y, b, _ = make_linear_logprob(
        33, 40, 257, dtype=torch.float32, bias=True, n_ignore=3, **SCALES
    )
    g = upstream(33)[0].float()

    def f(hh, ww, bb):
        return (rk.linear_logprob(hh, ww, y, bias=bb, softcap=8.0, impl="cpu") * g).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (f, compiled):
        leaves = [t.clone().requires_grad_() for t in (h, W, b)]
        loss = fn(*leaves)
        results.append([loss.detach()] + list(torch.autograd.grad(loss, leaves)))
    for a, e in zip(*results, strict=True):
        assert not torch.isnan(a).any()
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", [(37, 50, 1031), (1, 1, 1)], ids=["N37-H50-V1031", "N1-H1-V1"])
def test_gemm_floor_runs_the_kernels_gemms(tiles, dtype, shape):
    """The benchmarks' yardstick (``cpu.gemm_floor``): the kernel's GEMMs without its epilogues,
    dz = z, so dh = (h W^T) W and dW = (h W^T)^T h over every row block and vocabulary tile."""
    N, H, V = shape
    h, W, _, _, _ = make_linear_logprob(N, H, V, dtype=dtype, bias=False, n_ignore=0, **SCALES)
    assert llp_cpu.gemm_floor(h, W, backward=False) is None
    dh, dw = llp_cpu.gemm_floor(h, W)
    z = h.double() @ W.double().T
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert (dh.dtype, dw.dtype) == (dtype, dtype)
    assert_close(dh, z @ W.double(), rtol=tol, name="dh")
    assert_close(dw, z.T @ h.double(), rtol=tol, name="dW")


def test_gemm_floor_bf16_runs_the_paths_gemms(bf16_path, tiles):
    """bf16 inputs: the floor takes the op's GEMM path (native: dz = z rounded to bf16, as the
    kernel's dz; converted: fp32 GEMMs on the upcast values), gradients rounded to bf16 once."""
    h, W, _, _, _ = make_linear_logprob(38, 63, 517, dtype=torch.bfloat16, n_ignore=0, **SCALES)
    dh, dw = llp_cpu.gemm_floor(h, W)
    z = h.double() @ W.double().T
    if bf16_path == "native":
        z = z.to(torch.bfloat16).double()
    assert (dh.dtype, dw.dtype) == (torch.bfloat16, torch.bfloat16)
    # one bf16 rounding of the result, plus dz roundings that fp32 accumulation can flip
    assert_close(dh, z @ W.double(), rtol=2**-7, name=f"{bf16_path} dh")
    assert_close(dw, z.T @ h.double(), rtol=2**-7, name=f"{bf16_path} dW")
    f32 = llp_cpu.gemm_floor(h.float(), W.float())
    same = [torch.equal(a, e.to(torch.bfloat16)) for a, e in zip((dh, dw), f32, strict=True)]
    assert same == [bf16_path != "native"] * 2
