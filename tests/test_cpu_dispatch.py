"""CPU dispatch of the C++ LM-head kernels (csrc/vec_math.h, csrc/micro_gemm.h).

* The GEMM paths of bf16 inputs in token smoothing and in the RAG losses built on the kernels:
  ``native`` (bf16 micro-kernel GEMMs, fp32 outputs; skipped where the CPU has no bf16
  matmul), ``fp32-micro`` (fp32 micro-kernel GEMMs, operands converted while packing) and
  ``aten`` (tiles converted to fp32 for ATen's GEMMs, forced by lowering the ISA), each within
  2x the error of plain PyTorch's materialising bf16 path against a float64 truth.
  (linear_logprob's are in test_linear_logprob_cpu.py.)
* Every compiled ISA version of the token-smoothing epilogue against float64.
* ``RAG_KERNELS_CPU_ISA``: read at the first kernel call, capped at the CPU's ISA, a bad
  value names the variable.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import rag_kernels as rk
from rag_kernels.ops import registry
from toolkit import assert_close, make_token_smoothing

_WHY = registry.unavailable_reason("token_smoothing", "cpu")
if _WHY:
    pytest.skip(f"token_smoothing impl='cpu': {_WHY}", allow_module_level=True)

from rag_kernels.ops import _C  # noqa: E402
from rag_kernels.ops.token_smoothing import TokenSmoothingOptions, token_smoothing_core  # noqa: E402
from rag_kernels.ops.token_smoothing import cpu as ts_cpu  # noqa: E402
from rag_kernels.ops.token_smoothing.reference import token_smoothing_reference  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=[(0, 0, 0, 0), (5, 16, 7, 16)], ids=["default-tiles", "small-tiles"])
def ts_tiles(request):
    old = ts_cpu.TILES
    ts_cpu.TILES = request.param
    yield request.param
    ts_cpu.TILES = old


def _grads(fn, leaves, upstream):
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    out = fn(*leaves)
    return out.detach(), list(torch.autograd.grad(out, leaves, upstream.to(out.dtype)))


@pytest.mark.parametrize("shape", [(2, 3, 7, 24, 157), (2, 4, 5, 33, 211)], ids=["H24", "H33"])
@pytest.mark.parametrize("softcap", [None, 5.0], ids=["nocap", "cap5"])
def test_token_smoothing_bf16_within_2x_of_materialising_bf16(bf16_path, ts_tiles, shape, softcap):
    B, K, T, H, V = shape
    hidden, weight, scores, b, mask = make_token_smoothing(
        B, K, T, H, V, bias=True, doc_mask=True, wscale=3.0
    )
    hl, wl, bl = (x.to(torch.bfloat16) for x in (hidden, weight, b))
    scores = scores.float()
    upstream = torch.rand(B, T, dtype=torch.float64)
    opts = TokenSmoothingOptions(softcap=softcap)

    def ours(h, w, s, bb):
        return token_smoothing_core(h, w, s, None, bb, mask, opts, "cpu")[0]

    def ref(h, w, s, bb):
        return token_smoothing_reference(h, w, s, bb, softcap, mask)

    out, g = _grads(ours, [hl, wl, scores, bl], upstream)
    base, base_g = _grads(ref, [hl, wl, scores, bl], upstream)
    truth, truth_g = _grads(ref, [hl.double(), wl.double(), scores.double(), bl.double()], upstream)
    assert out.dtype == torch.float32 and g[0].dtype == g[1].dtype == torch.bfloat16
    names = ["out", "hidden", "weight", "doc_scores", "bias"]
    for name, x, bx, tx in zip(names, [out, *g], [base, *base_g], [truth, *truth_g], strict=True):
        assert_close(x, tx, ref=bx, rtol=1e-3, atol=1e-5, name=f"{bf16_path} {name}")
    assert (g[0][~mask] == 0).all()


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_rag_loss_bf16_eps01_within_2x_of_materialising_bf16(bf16_path, mode):
    """rk.hf.rag_*_get_nll(epsilon=0.1) on bf16 hidden states and head (token smoothing, or
    linear_logprob with statistics), against the same loss on float64."""
    B, K, T, H, V, pad = 2, 3, 6, 40, 97, 0
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(B * K, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (3.0 / H**0.5)
    scores = torch.randn(B, K, generator=g, dtype=torch.float64)
    target = torch.randint(1, V, (B, T), generator=g)
    target[1, -2:] = pad
    fn = rk.hf.rag_token_get_nll if mode == "token" else rk.hf.rag_sequence_get_nll

    def loss(h, w, s, impl):
        return fn(h, w, s, target, pad_token_id=pad, epsilon=0.1, n_docs=K, impl=impl)

    hl, wl = hidden.to(torch.bfloat16), weight.to(torch.bfloat16)
    sl = scores.float()
    up = torch.rand(B, dtype=torch.float64)
    out, gr = _grads(lambda h, w, s: loss(h, w, s, "cpu"), [hl, wl, sl], up)
    base, base_g = _grads(lambda h, w, s: loss(h, w, s, "reference"), [hl, wl, sl], up)
    truth, truth_g = _grads(
        lambda h, w, s: loss(h, w, s, "reference"), [hl.double(), wl.double(), sl.double()], up
    )
    for name, x, bx, tx in zip(
        ["loss", "hidden", "weight", "doc_scores"], [out, *gr], [base, *base_g], [truth, *truth_g],
        strict=True,
    ):  # fmt: skip
        assert_close(x, tx, ref=bx, rtol=1e-3, atol=1e-5, name=f"{bf16_path} {mode} {name}")


@pytest.mark.parametrize("isa", ["default", "avx2", "avx2-aten", "avx512", "avx512-aten"])
def test_every_token_smoothing_epilogue_isa_matches_float64(ts_tiles, isa):
    order = ["default", "avx2", "avx512"]
    runs = order[: order.index(_C.detected_isa()) + 1]
    name = isa.removesuffix("-aten")
    if name not in runs:
        pytest.skip(f"this CPU runs {runs}, not {name}")
    B, K, T, H, V = 2, 3, 5, 17, 131
    hidden, weight, scores, b, mask = make_token_smoothing(
        B, K, T, H, V, bias=True, doc_mask=True, hscale=2.0
    )
    upstream = torch.rand(B, T, dtype=torch.float64)
    opts = TokenSmoothingOptions(softcap=4.0)
    prev, gemm = _C.cpu_isa(), _C.cpu_gemm()
    try:
        _C.set_cpu_isa(name)
        _C.set_cpu_gemm("aten" if isa.endswith("-aten") else "auto")
        out, g = _grads(
            lambda h, w, s, bb: token_smoothing_core(h, w, s, None, bb, mask, opts, "cpu")[0],
            [x.float() for x in (hidden, weight, scores, b)],
            upstream,
        )
    finally:
        _C.set_cpu_isa(prev)
        _C.set_cpu_gemm(gemm)
    truth, truth_g = _grads(
        lambda h, w, s, bb: token_smoothing_reference(h, w, s, bb, 4.0, mask),
        [hidden, weight, scores, b],
        upstream,
    )
    for name, x, tx in zip(["out", "hidden", "weight", "doc_scores", "bias"], [out, *g],
                           [truth, *truth_g], strict=True):  # fmt: skip
        assert_close(x, tx, rtol=2e-5, atol=1e-6, name=f"{isa} {name}")


def test_token_smoothing_wide_vocab_spans_several_column_chunks():
    """One vocabulary tile covering V = 2500: the forward mixes documents in column chunks of
    1024 (csrc/token_smoothing.cpp, kTokenChunk), a ragged last one included; NaN in one
    kept document's hidden state still makes its token's statistic NaN."""
    B, K, T, H, V = 2, 3, 4, 16, 2500
    hidden, weight, scores, b, mask = make_token_smoothing(
        B, K, T, H, V, bias=True, doc_mask=True, hscale=2.0
    )
    upstream = torch.rand(B, T, dtype=torch.float64)
    opts = TokenSmoothingOptions()
    out, g = _grads(
        lambda h, w, s, bb: token_smoothing_core(h, w, s, None, bb, mask, opts, "cpu")[0],
        [x.float() for x in (hidden, weight, scores, b)],
        upstream,
    )
    truth, truth_g = _grads(
        lambda h, w, s, bb: token_smoothing_reference(h, w, s, bb, None, mask),
        [hidden, weight, scores, b],
        upstream,
    )
    for name, x, tx in zip(["out", "hidden", "weight", "doc_scores", "bias"], [out, *g],
                           [truth, *truth_g], strict=True):  # fmt: skip
        assert_close(x, tx, rtol=2e-5, atol=1e-6, name=name)
    k = int(mask[0].nonzero()[0, 0])
    h_nan = hidden.float().clone()
    h_nan[0, k, 2, 5] = float("nan")
    with torch.no_grad():
        o = token_smoothing_core(h_nan, weight.float(), scores.float(), None, b.float(), mask,
                                 opts, "cpu")[0]  # fmt: skip
    assert torch.isnan(o[0, 2]) and not torch.isnan(o[0, :2]).any() and not torch.isnan(o[1]).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_token_smoothing_aten_forward_splits_columns_over_threads(dtype):
    """ATen path, 2 threads, V = 2500: the forward's logits run as 1024-column GEMMs (a ragged
    last one) written into a strided view of one buffer (csrc/tile_gemm.h, AtenLogits); with
    a target, padding tokens are skipped. Outputs and gradients match float64."""
    B, K, T, H, V = 2, 3, 5, 16, 2500
    hidden, weight, scores, b, mask = make_token_smoothing(
        B, K, T, H, V, bias=True, doc_mask=True, hscale=2.0
    )
    target = torch.randint(0, V, (B, T))
    target[1, 3:] = -1
    upstream = torch.rand(B, T, dtype=torch.float64)
    opts = TokenSmoothingOptions(softcap=6.0)

    def outputs(h, w, s, bb, impl):
        out, lp = token_smoothing_core(h, w, s, target, bb, mask, opts, impl)
        return out + 0.37 * lp.sum(1)

    prev_threads, gemm = torch.get_num_threads(), _C.cpu_gemm()
    try:
        torch.set_num_threads(2)
        _C.set_cpu_gemm("aten")
        out, g = _grads(
            lambda h, w, s, bb: outputs(h, w, s, bb, "cpu"),
            [x.to(dtype) for x in (hidden, weight, scores, b)],
            upstream,
        )
    finally:
        _C.set_cpu_gemm(gemm)
        torch.set_num_threads(prev_threads)
    truth, truth_g = _grads(
        lambda h, w, s, bb: outputs(h, w, s, bb, "reference"), [hidden, weight, scores, b], upstream
    )
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    for name, x, tx in zip(["out", "hidden", "weight", "doc_scores", "bias"], [out, *g],
                           [truth, *truth_g], strict=True):  # fmt: skip
        assert_close(x, tx, rtol=tol, atol=tol / 20, name=f"{dtype} {name}")


def _in_subprocess(code: str, isa: str, extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAG_KERNELS_CPU_ISA=isa, **(extra or {}))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )


def test_env_override_caps_the_isa_and_forces_converted_bf16():
    code = (
        "import torch, rag_kernels as rk\n"
        "from rag_kernels.ops import _C\n"
        "h = torch.randn(5, 8, dtype=torch.bfloat16); w = torch.randn(11, 8, dtype=torch.bfloat16)\n"
        "rk.linear_logprob(h, w, torch.arange(5), impl='cpu')\n"
        "print(_C.cpu_isa(), _C.detected_isa(), _C.native_bf16_gemm(), _C.fp32_gemm())\n"
    )
    proc = _in_subprocess(code, "avx2")
    assert proc.returncode == 0, proc.stderr
    isa, detected, native, fp32_gemm = proc.stdout.split()
    assert isa == ("avx2" if detected in ("avx2", "avx512") else "default")
    assert native == "False"
    assert fp32_gemm == ("avx2" if isa == "avx2" else "aten")


def test_env_gemm_mode_aten_turns_the_micro_kernels_off():
    code = (
        "import torch, rag_kernels as rk\n"
        "from rag_kernels.ops import _C\n"
        "rk.linear_logprob(torch.randn(5, 8), torch.randn(11, 8), torch.arange(5), impl='cpu')\n"
        "print(_C.cpu_gemm(), _C.fp32_micro_gemm(), _C.native_bf16_gemm(), _C.fp32_gemm())\n"
    )
    env = {"RAG_KERNELS_CPU_GEMM": "aten"}
    proc = _in_subprocess(code, "auto", env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["aten", "False", "False", "aten"]


def test_env_override_bad_value_names_the_variable():
    code = (
        "import torch, rag_kernels as rk\n"
        "rk.linear_logprob(torch.randn(3, 4), torch.randn(7, 4), torch.arange(3), impl='cpu')\n"
    )
    proc = _in_subprocess(code, "sse9")
    assert proc.returncode != 0
    assert "RAG_KERNELS_CPU_ISA must be one of" in proc.stderr and "'sse9'" in proc.stderr
