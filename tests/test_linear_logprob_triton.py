"""Triton linear_logprob kernels (run on CPU under TRITON_INTERPRET=1) vs the float64 reference.

Every test runs with the kernels' fp32 scratch buffers NaN-filled, so a partial result the
forward kernel forgot to write shows up as NaN.
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

from rag_kernels.ops.linear_logprob import triton as tk  # noqa: E402


@pytest.fixture(autouse=True)
def _nan_scratch(monkeypatch):
    nan_scratch(monkeypatch, tk)


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
def test_fp32_matches_float64_reference(shape, opt, monkeypatch):
    _check_against_reference(SHAPES[shape], OPTIONS[opt], 1, monkeypatch)


@pytest.mark.parametrize("opt", ["plain", "bias_softcap"])
def test_vocab_splits_combine(opt, monkeypatch):
    # 3 splits of 64/64/3 columns: the partial-LSE merge and a split of a single partial tile.
    _check_against_reference((37, 50, 131), OPTIONS[opt], 3, monkeypatch)


def test_only_logprob_used_and_partial_needs():
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


def test_zero_upstream_rows_skipped_exactly():
    h, w, y, _, ups = make_linear_logprob(40, 12, 45, dtype=torch.float32, n_ignore=3, wscale=2.0)
    zero_rows = torch.zeros(40, dtype=torch.bool)
    zero_rows[5:30] = True  # active rows interleaved: the kernel reorders them
    ups = [torch.where(zero_rows, 0.0, u) for u in ups]
    _, g_ref = run("reference", h.double(), w.double(), y, None, ups)
    _, g = run("triton", h, w, y, None, ups)
    assert (g[0][zero_rows] == 0).all()
    assert_close(g[0], g_ref[0], rtol=1e-5, name="d_hidden")
    assert_close(g[1], g_ref[1], rtol=1e-5, name="d_weight")


def test_all_rows_ignored():
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
def test_low_precision_within_twice_torch_error(dtype):
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


def _bwd(h, w, y, b, ups, filter_eps, with_sum=False):
    opts = SimpleNamespace(ignore_index=IGN, softcap=None, filter_eps=filter_eps)
    _, lse, _ = tk.forward(h, w, y, b, opts)
    g = [u.float() for u in ups]
    return tk.backward(
        h, w, y, b, lse, g[0], g[1], g[2] if with_sum else None, opts, (True, True, True)
    )


def test_filter_eps_error_within_documented_bound():
    h, w, y, b, ups = _filter_case()
    eps = 1e-3
    exact = _bwd(h, w, y, b, ups, None)
    filt = _bwd(h, w, y, b, ups, eps)
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


def test_filter_eps_never_skips_with_label_smoothing_gradient():
    h, w, y, b, ups = _filter_case()
    exact = _bwd(h, w, y, b, ups, None, with_sum=True)
    filt = _bwd(h, w, y, b, ups, 1e-3, with_sum=True)
    for f, e in zip(filt, exact, strict=False):
        torch.testing.assert_close(f, e, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------- H100 compile check

_AOT = r"""
import json, os, re, subprocess, sys, tempfile
import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as exc:
    print("SKIP", exc); sys.exit(0)
from rag_kernels.ops.linear_logprob import triton as tk

tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
if not os.path.exists(os.path.join(tools, "ptxas")):
    print("SKIP no ptxas in the triton wheel"); sys.exit(0)
common = dict(h_ptr="*{dt}", w_ptr="*{dt}", b_ptr="*{dt}", y_ptr="*i64", rows_ptr="*i64",
              nact_ptr="*i64")
FWD = dict(common, m_ptr="*fp32", s_ptr="*fp32", zt_ptr="*fp32", zs_ptr="*fp32", N="i32",
           V="i32", D="i32", Y_INNER="i32", Y_GROUP="i32", split_len="i32", softcap="fp32",
           N_KEY="i32")
BWD = dict(common, lse_ptr="*fp32", glp_ptr="*fp32", glse_ptr="*fp32", gs_ptr="*fp32",
           dh_ptr="*fp32", dw_ptr="*fp32", db_ptr="*fp32", N="i32", V="i32", D="i32",
           Y_INNER="i32", Y_GROUP="i32", softcap="fp32", filter_eps="fp32", N_KEY="i32")
for dt, bits in (("bf16", 16), ("fp32", 32)):
    prec = "ieee" if bits == 32 else "tf32"
    for name, kern, sig, cfg, consts in (
        ("fwd", tk.linear_logprob_fwd_kernel, FWD, getattr(tk, f"_FWD_CONFIGS_{bits}")[0],
         dict(HAS_BIAS=True, SOFTCAP=True)),
        ("bwd", tk.linear_logprob_bwd_kernel, BWD, getattr(tk, f"_BWD_CONFIGS_{bits}")[0],
         dict(HAS_BIAS=True, SOFTCAP=True, HAS_GLSE=True, HAS_GS=True, NEED_DH=True,
              NEED_DW=True, NEED_DB=True, FILTER=True)),
    ):
        sig = {k: v.format(dt=dt) for k, v in sig.items()}
        consts = dict(consts, INPUT_PRECISION=prec, UPCAST=False, **cfg.kwargs)
        sig.update({k: "constexpr" for k in consts})
        names = list(kern.arg_names)
        # what a launch specializes on for 16-divisible sizes and aligned tensors
        attrs = {(names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items()
                 if v.startswith("*") or k in ("N", "V", "D", "split_len", "N_KEY")}
        try:
            src = ASTSource(kern, sig, consts, attrs)
        except TypeError as exc:
            print("SKIP", exc); sys.exit(0)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"]); f.flush()
            use = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage",
                                  f.name], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+)", use)
        print(json.dumps(dict(kernel=name, dtype=dt, regs=int(m.group(1)),
                              stack=int(m.group(2)), smem=k.metadata.shared)))
"""


@pytest.mark.slow
def test_default_configs_compile_for_h100():
    """Compile the default configs for sm_90 offline: fit shared memory, bf16 spills nothing."""
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run(
        [sys.executable, "-c", _AOT], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    if proc.stdout.startswith("SKIP"):
        pytest.skip(proc.stdout.strip())
    import json

    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 4, proc.stdout
    for r in rows:
        assert r["smem"] <= 232448, r  # H100: 227 KiB of shared memory per block
        if r["dtype"] == "bf16":
            assert r["stack"] == 0, r  # no register spills on the tensor-core path
