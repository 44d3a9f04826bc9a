"""Triton kernels for the fused LM head (docs/design.md §2.1): per-row ``lp``, ``lse``, ``sum_logprob``.

Math, per row r: ``z_rv = W_v . h_r (+ b_v)``, optionally ``z = c tanh(z / c)``;
``lse_r = logsumexp_v z_rv``; ``lp_r = z_r[y_r] - lse_r``; ``S_r = sum_v z_rv - V lse_r``.
Backward: ``p = exp(z - lse)``,
``dz_rv = g_r (1[v=y_r] - p_rv) + g^S_r (1 - V p_rv) + g^lse_r p_rv`` (times ``1 - (z/c)^2``
under softcap); ``dh_r = sum_v dz_rv W_v``; ``dW_v = sum_r dz_rv h_r``; ``db_v = sum_r dz_rv``.

Design:

* Active rows first. Rows that contribute nothing (ignored targets; in the backward also rows
  whose three upstream gradients are all zero) are moved to the end of a permutation
  ``rows`` (a stable partition from one ``cumsum`` + ``scatter``, no host sync) and the active
  count travels as a device scalar.
  Kernels address rows through ``rows`` (no copy of ``hidden``), load inactive rows as
  zeros (NaN-poisoned hidden states never enter a sum) and blocks with no active row do no
  work at all. Skipping is exact: such rows' contributions are zero by definition.
* Forward: program ``(row block, vocab split)`` loops over ``BLOCK_V`` vocab tiles of its split,
  forms the logit tile with ``tl.dot`` (fp32 accumulation; fp32 inputs use IEEE fp32, never
  TF32), and keeps an online max / sum-exp, the target logit and ``sum_v z`` (summed in-kernel,
  which also covers bias and softcap). Vocab splits exist only to fill the GPU when ``N`` is
  small; the per-split partials (``[splits, N]`` fp32 each) are merged by a few torch ops.
  Nothing of size ``V`` is stored; the autograd shell saves the fp32 ``lse``.
* Backward, ``"deterministic"`` (the default): per vocabulary chunk ``[v0, v0 + C)`` the
  kernel ``linear_logprob_dz_kernel`` recomputes the logit tiles of the active rows (in the
  partition's order: blocks of inactive rows only write zeros) and writes ``dz [N, C]`` in
  the rows' own order and the input dtype (rounded once, as plain PyTorch's bf16 / fp16
  path rounds the logit gradient; fp32 stays fp32); then cuBLAS (ATen) does
  ``dh += dz @ W[chunk]`` (fp32 accumulator across chunks), ``dW[chunk] = dz^T @ h`` and
  ``db[chunk] = sum_r dz`` (fp32 sum). No atomics: bitwise reproducible run to run. No host
  sync either, so the GEMMs run over all ``N`` rows (an inactive row's dz is exactly 0; its
  hidden row is replaced by zeros for ``dW``, so NaN there never enters). Inactive rows thus
  cost no recompute but their share of the two GEMMs.
  Memory: the dz buffer is at most ``max(1 % of N V, 256 MiB / elem)`` elements
  (:func:`~rag_kernels.ops.triton_utils.chunk_columns`; ``CHUNK_COLUMNS`` overrides the width
  for tests / tuning), plus ``O(N H)`` buffers: the fp32 ``dh`` accumulator and each chunk's
  fp32 product, and ``h`` with inactive rows zeroed (when dW is needed). FLOPs: ``2NHV``
  recompute (active rows) + ``4NHV`` in the two GEMMs. fp32 gradient GEMMs follow torch's
  float32 matmul precision (IEEE unless the user allows TF32).
* Backward, ``"atomic"`` (``opts.triton_backward="atomic"`` or
  ``RAG_KERNELS_TRITON_BACKWARD=atomic``): one program per ``(row block, vocab tile)``
  recomputes the logit tile, forms ``dz`` in registers, then walks ``H`` in ``BLOCK_K``
  chunks, adding ``dz @ W`` into an fp32 ``dh`` buffer and ``dz^T @ h`` into an fp32 ``dW``
  buffer with relaxed atomics (``db`` too). Same FLOPs, no sync and no ``dz`` buffer, but fp32
  ``[V, H]`` / ``[N, H]`` buffers and a run-to-run nondeterministic summation order. Kept for
  the GPU benchmark to time against the deterministic variant.
* Optional ``filter_eps`` (``opts.filter_eps``, off by default): a backward tile is skipped when
  it holds no active row's target, no row of the block has a nonzero ``grad_sum`` and every
  ``p < filter_eps``. Every skipped ``dz_rv = (g^lse_r - g_r) p_rv`` then has
  ``|dz_rv| < (|g_r| + |g^lse_r|) filter_eps``, so for each row
  ``|dh_r error| <= (|g_r| + |g^lse_r|) filter_eps sum_v |W_v|`` (elementwise) and
  ``|dW_v error| <= filter_eps sum_r (|g_r| + |g^lse_r|) |h_r|``, ``|db_v error|`` likewise.
  Both variants apply it to the tiles of their own launch (the bound holds for each); only
  the atomic one saves the skipped tiles' gradient FLOPs (the deterministic one writes their
  ``dz`` as zeros for cuBLAS).
* dtypes: fp32 / bf16 / fp16 inputs; fp64 raises ``TypeError`` (use ``impl="reference"``).
  Outputs and saved statistics are fp32.
* Tuning: autotuned configs for H100 on CUDA, one list for 16-bit inputs and one for fp32,
  and 16-bit lists of their own with softcap (one autotuner per input width and softcap;
  ``RAG_KERNELS_AUTOTUNE=0``, read at import, pins the first of each, e.g. for quick
  correctness runs); one tiny fixed config under ``TRITON_INTERPRET=1``. The autotune key is
  ``(H, V or the chunk width, N rounded up to a power of two)`` plus the dtypes, so varying N
  does not re-tune. Every GPU config of every kernel compiles for sm_90 without spills and
  within the shared memory, under triton 3.9 and the GPU image's 3.6
  (tests/test_triton_compile.py).
  The interpreter of triton 3.9 mis-computes ``tl.dot`` on bf16 operands and truncates
  fp32 -> bf16 casts, so there the operands (rounded to nearest-even in the input dtype, as
  on the GPU) are upcast to fp32 first: same products, fp32 accumulation, as on the tensor
  cores.
* torch ops: the host launchers :func:`launch_forward` / :func:`launch_backward` are the
  opaque ops ``torch.ops.rag_kernels.linear_logprob_fwd_triton`` / ``..._bwd_triton``
  (``registry.launcher_op``, fakes next to them, at the end of this file), which ``forward``
  / ``backward`` call: ``torch.compile`` records one node per launch, without a graph break,
  also under ``dynamic=True`` (docs/design.md §4.2).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import registry
from .. import triton_utils as tu
from ..triton_utils import accumulate_grads, logit_tile, round_to, swizzle

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_AUTOTUNE = os.environ.get("RAG_KERNELS_AUTOTUNE", "1") != "0"
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def available() -> bool:
    """True when triton imported (this module only loads then)."""
    return True


def _cfg(bn, bv, bk, warps, stages, **extra):
    return triton.Config(
        {"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk, **extra}, num_warps=warps, num_stages=stages
    )


# Every config below compiles for sm_90 offline (triton 3.9 and the GPU image's 3.6, each
# with its ptxas) without spills and within the H100's 227 KiB of shared memory, for every
# feature combination of its list (tests/test_triton_compile.py). fp32 inputs use IEEE fp32
# (FMA, no tensor cores) and small tiles. The dz kernel of the deterministic backward is
# forward-like (one logit tile and an elementwise epilogue, no second GEMM in registers), so
# it takes the forward's tile shapes.
if _INTERPRET:
    _FWD_CONFIGS_16 = _FWD_CONFIGS_32 = [_cfg(16, 32, 16, 1, 1)]
    _DZ_CONFIGS_16 = _DZ_CONFIGS_32 = [_cfg(16, 32, 16, 1, 1, GROUP_N=2)]
    _BWD_CONFIGS_16 = _BWD_CONFIGS_32 = [_cfg(16, 32, 16, 1, 1, GROUP_N=2)]
    _FWD_SOFTCAP_16, _DZ_SOFTCAP_16 = _FWD_CONFIGS_16, _DZ_CONFIGS_16
    _SPLIT_ALIGN = 32
else:
    _FWD_CONFIGS_16 = [
        _cfg(128, 128, 64, 8, 3),
        _cfg(128, 128, 64, 8, 4),
        _cfg(64, 256, 64, 8, 4),
        _cfg(64, 128, 64, 4, 4),
    ]
    _DZ_CONFIGS_16 = [
        _cfg(128, 128, 64, 8, 3, GROUP_N=8),
        _cfg(128, 128, 64, 8, 4, GROUP_N=16),
        _cfg(64, 256, 64, 8, 4, GROUP_N=8),
        _cfg(128, 64, 64, 4, 4, GROUP_N=8),
    ]
    _BWD_CONFIGS_16 = [
        _cfg(128, 64, 64, 8, 3, GROUP_N=8),
        _cfg(256, 64, 64, 8, 3, GROUP_N=4),
    ]
    # With the softcap epilogue (tanh on every logit) the 128 x 128 tiles (and the 4-warp
    # 64 x 128 one), which sit at the 255-register cap without it, spill under triton 3.6 (the
    # GPU image's); these leave room (about 130-190 registers, both versions).
    _FWD_SOFTCAP_16 = [
        _cfg(64, 256, 64, 8, 4),
        _cfg(128, 64, 64, 8, 3),
        _cfg(64, 128, 64, 8, 4),
    ]
    _DZ_SOFTCAP_16 = [
        _cfg(64, 256, 64, 8, 4, GROUP_N=8),
        _cfg(128, 64, 64, 8, 3, GROUP_N=8),
        _cfg(64, 128, 64, 8, 4, GROUP_N=8),
        _cfg(128, 64, 64, 4, 4, GROUP_N=8),
    ]
    _FWD_CONFIGS_32 = [_cfg(64, 128, 32, 8, 3), _cfg(32, 64, 32, 4, 3), _cfg(64, 64, 32, 4, 2)]
    _DZ_CONFIGS_32 = [
        _cfg(64, 128, 32, 8, 3, GROUP_N=8),
        _cfg(32, 64, 32, 4, 3, GROUP_N=8),
        _cfg(64, 64, 32, 8, 2, GROUP_N=8),
    ]
    _BWD_CONFIGS_32 = [
        _cfg(64, 64, 32, 8, 3, GROUP_N=8),
        _cfg(32, 64, 32, 8, 3, GROUP_N=8),
        _cfg(32, 64, 32, 4, 2, GROUP_N=8),
    ]
    _SPLIT_ALIGN = 256
    if not _AUTOTUNE:
        _FWD_CONFIGS_16, _FWD_CONFIGS_32 = _FWD_CONFIGS_16[:1], _FWD_CONFIGS_32[:1]
        _DZ_CONFIGS_16, _DZ_CONFIGS_32 = _DZ_CONFIGS_16[:1], _DZ_CONFIGS_32[:1]
        _BWD_CONFIGS_16, _BWD_CONFIGS_32 = _BWD_CONFIGS_16[:1], _BWD_CONFIGS_32[:1]
        _FWD_SOFTCAP_16, _DZ_SOFTCAP_16 = _FWD_SOFTCAP_16[:1], _DZ_SOFTCAP_16[:1]

# Deterministic backward: vocabulary columns per chunk; None = the memory budget of
# triton_utils.chunk_columns (tests set a small width to get several chunks at tiny V).
CHUNK_COLUMNS: int | None = None


# ----------------------------------------------------------------------------- device code


@triton.jit
def linear_logprob_fwd_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    rows_ptr,
    nact_ptr,
    m_ptr,
    s_ptr,
    zt_ptr,
    zs_ptr,
    N,
    V,
    D,
    Y_INNER,
    Y_GROUP,
    split_len,
    softcap,
    N_KEY,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_act = tl.load(nact_ptr)
    pos = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = pos < n_act
    rows = tl.load(rows_ptr + pos, mask=pos < N, other=0)
    y = tl.load(y_ptr + (rows // Y_GROUP) * Y_INNER + rows % Y_INNER, mask=row_ok, other=-1)
    hrow = rows * D
    v_start = pid_s * split_len
    v_stop = tl.minimum(v_start + split_len, V)
    v_stop = tl.where(pid_n * BLOCK_N < n_act, v_stop, v_start)  # no active row: no work

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zs = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_start, v_stop, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < v_stop
        z = logit_tile(
            h_ptr,
            w_ptr,
            b_ptr,
            hrow,
            row_ok,
            offs_v,
            v_ok,
            D,
            softcap,
            HAS_BIAS,
            SOFTCAP,
            INPUT_PRECISION,
            UPCAST,
            BLOCK_N,
            BLOCK_V,
            BLOCK_K,
        )
        zm = tl.where(v_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(zm, axis=1))
        # all -inf so far (a -inf bias over whole tiles): shift by 0, not by -inf (NaN)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(zm - shift[:, None]), axis=1)
        m = m_new
        zt += tl.sum(tl.where(offs_v[None, :] == y[:, None], z, 0.0), axis=1)
        zs += tl.sum(tl.where(v_ok[None, :], z, 0.0), axis=1)

    out = pid_s.to(tl.int64) * N + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(zt_ptr + out, zt, mask=row_ok)
    tl.store(zs_ptr + out, zs, mask=row_ok)


@triton.jit
def _dz_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    lse_ptr,
    glp_ptr,
    glse_ptr,
    gs_ptr,
    rows,
    row_ok,
    offs_v,
    v_ok,
    v_lo,
    v_hi,
    V,
    D,
    Y_INNER,
    Y_GROUP,
    softcap,
    filter_eps,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_GLSE: tl.constexpr,
    HAS_GS: tl.constexpr,
    FILTER: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``(dz, keep)``: the fp32 ``[BLOCK_N, BLOCK_V]`` logit gradient of rows ``rows``
    (``row_ok``: active) at vocab ids ``offs_v`` (``v_ok``: valid, the ids in
    ``[v_lo, v_hi)``), and under ``FILTER`` whether the tile is kept (else True). Inactive
    rows give exact zeros; columns off ``v_ok`` hold values the callers mask out."""
    hrow = rows * D  # int64 (rows is)
    y = tl.load(y_ptr + (rows // Y_GROUP) * Y_INNER + rows % Y_INNER, mask=row_ok, other=-1)
    # Inactive rows get lse = +inf, so p = 0 and (their upstream gradients being 0) dz = 0.
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))
    # dz = g (1[v=y] - p) + gl p + gs (1 - V p) = a + b p (+ g at v = y)
    g = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
    a = tl.zeros((BLOCK_N,), dtype=tl.float32)
    b = -g
    if HAS_GLSE:
        b += tl.load(glse_ptr + rows, mask=row_ok, other=0.0)
    if HAS_GS:
        gs = tl.load(gs_ptr + rows, mask=row_ok, other=0.0)
        a = gs
        b -= V * gs
    z = logit_tile(
        h_ptr,
        w_ptr,
        b_ptr,
        hrow,
        row_ok,
        offs_v,
        v_ok,
        D,
        softcap,
        HAS_BIAS,
        SOFTCAP,
        INPUT_PRECISION,
        UPCAST,
        BLOCK_N,
        BLOCK_V,
        BLOCK_K,
    )
    # Few full tiles live at once (register pressure): p, then dz in place.
    p = tl.exp(z - lse[:, None])
    keep = True
    if FILTER:
        p_max = tl.max(tl.max(tl.where(v_ok[None, :], p, 0.0), axis=1), axis=0)
        y_in = (y >= v_lo) & (y < v_hi) & row_ok
        keep = (p_max >= filter_eps) | (tl.max(y_in.to(tl.int32), axis=0) > 0)
        if HAS_GS:
            keep = keep | (tl.max(tl.abs(gs), axis=0) > 0)
    dz = a[:, None] + b[:, None] * p
    dz = tl.where(offs_v[None, :] == y[:, None], dz + g[:, None], dz)
    if SOFTCAP:
        t = z / softcap
        dz = dz * (1.0 - t * t)
    return dz, keep


@triton.jit
def linear_logprob_dz_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    rows_ptr,
    nact_ptr,
    lse_ptr,
    glp_ptr,
    glse_ptr,
    gs_ptr,
    dz_ptr,
    N,
    V,
    D,
    Y_INNER,
    Y_GROUP,
    softcap,
    filter_eps,
    v0,
    c_len,
    dz_stride,
    N_KEY,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_GLSE: tl.constexpr,
    HAS_GS: tl.constexpr,
    FILTER: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    """``dz[r, j]`` (input dtype) of every row ``r = rows[pos]`` and the chunk's vocab ids
    ``v0 + j``, ``j < c_len``, in the rows' own order; inactive rows (positions past the
    active count) get zeros, and blocks of them do no other work."""
    pid_n, pid_v = swizzle(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(c_len, BLOCK_V), GROUP_N)
    n_act = tl.load(nact_ptr)
    pos = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pos_ok = pos < N
    rows = tl.load(rows_ptr + pos, mask=pos_ok, other=0)
    c_lo = pid_v * BLOCK_V
    offs_c = c_lo + tl.arange(0, BLOCK_V)
    c_ok = offs_c < c_len
    dz = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    if pid_n * BLOCK_N < n_act:
        d, keep = _dz_tile(
            h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, glp_ptr, glse_ptr, gs_ptr, rows, pos < n_act,
            v0 + offs_c, c_ok, v0 + c_lo, v0 + tl.minimum(c_lo + BLOCK_V, c_len), V, D,
            Y_INNER, Y_GROUP, softcap, filter_eps,
            HAS_BIAS, SOFTCAP, HAS_GLSE, HAS_GS, FILTER, INPUT_PRECISION, UPCAST,
            BLOCK_N, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        if FILTER:
            d = tl.where(keep, d, 0.0)
        dz = d
    out = (dz_ptr + rows * dz_stride)[:, None] + offs_c[None, :]  # rows is int64
    dz = round_to(dz, dz_ptr.dtype.element_ty, UPCAST).to(dz_ptr.dtype.element_ty)
    tl.store(out, dz, mask=pos_ok[:, None] & c_ok[None, :])


@triton.jit
def linear_logprob_bwd_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    rows_ptr,
    nact_ptr,
    lse_ptr,
    glp_ptr,
    glse_ptr,
    gs_ptr,
    dh_ptr,
    dw_ptr,
    db_ptr,
    N,
    V,
    D,
    Y_INNER,
    Y_GROUP,
    softcap,
    filter_eps,
    N_KEY,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_GLSE: tl.constexpr,
    HAS_GS: tl.constexpr,
    NEED_DH: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    FILTER: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    """The atomic backward: one (row block, vocab tile) per program, dh / dW / db by atomics."""
    pid_n, pid_v = swizzle(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP_N)
    n_act = tl.load(nact_ptr)
    if pid_n * BLOCK_N < n_act:
        pos = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = pos < n_act
        rows = tl.load(rows_ptr + pos, mask=pos < N, other=0)
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
        dz, keep = _dz_tile(
            h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, glp_ptr, glse_ptr, gs_ptr, rows, row_ok,
            offs_v, v_ok, pid_v * BLOCK_V, pid_v * BLOCK_V + BLOCK_V, V, D, Y_INNER, Y_GROUP,
            softcap, filter_eps,
            HAS_BIAS, SOFTCAP, HAS_GLSE, HAS_GS, FILTER, INPUT_PRECISION, UPCAST,
            BLOCK_N, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        k_stop = D
        if FILTER:
            k_stop = tl.where(keep, D, 0)
            if NEED_DB:
                db = tl.where(keep, tl.sum(dz, axis=0), 0.0)
                tl.atomic_add(db_ptr + offs_v, db, mask=v_ok, sem="relaxed")
        elif NEED_DB:
            tl.atomic_add(db_ptr + offs_v, tl.sum(dz, axis=0), mask=v_ok, sem="relaxed")

        accumulate_grads(
            dz, h_ptr, w_ptr, dh_ptr, dw_ptr, rows * D, row_ok, offs_v, v_ok, D, k_stop,
            NEED_DH, NEED_DW, INPUT_PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K,
        )  # fmt: skip


_FWD_KEY = ["D", "V", "N_KEY"]
_BWD_KEY = ["D", "V", "N_KEY"]
_DZ_KEY = ["D", "dz_stride", "N_KEY"]
# Benchmarking runs accumulate into the gradient buffers: restore_value puts their zeros back.
_BWD_RESTORE = ["dh_ptr", "dw_ptr", "db_ptr"]


# One autotuner per (input bits, softcap): the softcap epilogue has its own 16-bit lists, and
# a config tuned without it is never reused with it (the key does not see constexprs).
def _tuned(kernel, lists, key, **kw):
    return {
        (bits, cap): triton.autotune(configs=configs, key=key, **kw)(kernel)
        for bits, plain, softcap in lists
        for cap, configs in ((False, plain), (True, softcap))
    }


_FWD = _tuned(
    linear_logprob_fwd_kernel,
    [(16, _FWD_CONFIGS_16, _FWD_SOFTCAP_16), (32, _FWD_CONFIGS_32, _FWD_CONFIGS_32)],
    _FWD_KEY,
)
_DZ = _tuned(
    linear_logprob_dz_kernel,
    [(16, _DZ_CONFIGS_16, _DZ_SOFTCAP_16), (32, _DZ_CONFIGS_32, _DZ_CONFIGS_32)],
    _DZ_KEY,
)
_BWD = _tuned(
    linear_logprob_bwd_kernel,
    [(16, _BWD_CONFIGS_16, _BWD_CONFIGS_16), (32, _BWD_CONFIGS_32, _BWD_CONFIGS_32)],
    _BWD_KEY,
    restore_value=_BWD_RESTORE,
)


# ------------------------------------------------------------------------------- host code


def _empty(shape, device) -> torch.Tensor:
    """fp32 scratch whose every read element the kernels write first (tests NaN-fill it)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def _empty_dz(shape, device, dtype) -> torch.Tensor:
    """The backward's dz chunk buffer, every read element written first (tests NaN-fill it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check_dtype(hidden: torch.Tensor) -> None:
    if hidden.dtype not in _SUPPORTED:
        raise TypeError(
            "hidden must have dtype float32, bfloat16 or float16 for impl='triton', "
            f"got {hidden.dtype} (use impl='reference' for float64)"
        )


def _bits(hidden: torch.Tensor) -> int:
    return 32 if hidden.dtype == torch.float32 else 16


def _kernel_flags(hidden: torch.Tensor) -> dict:
    return {
        "INPUT_PRECISION": "ieee" if hidden.dtype == torch.float32 else "tf32",
        "UPCAST": _INTERPRET,
    }


def _n_key(n: int) -> int:
    """Autotune bucket for the row count (powers of two), so varying N does not re-tune."""
    return 1 << max(n - 1, 0).bit_length()


def _y_layout(target: torch.Tensor, n: int) -> tuple[int, int]:
    """``(inner, group)``: row r reads ``target[(r // group) * inner + r % inner]`` — ``[N]``
    targets: the row itself; ``[B, T]`` targets shared by K row groups: ``(T, K T)``."""
    if target.dim() == 1:
        return max(n, 1), max(n, 1)
    return max(target.shape[1], 1), max(n // max(target.shape[0], 1), 1)


def _kept_rows(target: torch.Tensor, n: int, ignore_index: int) -> torch.Tensor:
    """``[N]`` bool, True where the row's target is not ``ignore_index`` (the one per-row
    expansion of a shared ``[B, T]`` target: a mask, not the ids)."""
    keep = target != ignore_index
    if target.dim() == 1 or n == 0:
        return keep.reshape(-1)[:n]
    B, T = target.shape
    return keep[:, None, :].expand(B, n // (B * T), T).reshape(n)


def _num_splits(n: int, v: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(n, 128)
    want = triton.cdiv(2 * sms, row_blocks)
    return max(1, min(want, triton.cdiv(v, 4 * _SPLIT_ALIGN)))


def launch_forward(hidden, weight, target, bias, opts, *, num_splits: int | None = None):
    """``hidden [N,H]``, ``weight [V,H]``, ``target [N]`` or ``[B,T]`` shared by ``N/(B T)``
    row groups, ``bias [V]|None`` (contiguous) ->
    ``(lp, lse, sum_logprob)``, each ``[N]`` fp32, zero on ignored rows.

    ``num_splits`` (tests / tuning) overrides how many vocab splits share one row block.
    """
    _check_dtype(hidden)
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    keep = _kept_rows(target, N, opts.ignore_index)
    if N == 0:
        z = torch.zeros(0, dtype=torch.float32, device=dev)
        return z, z.clone(), z.clone()
    rows, n_act = tu.active_order(keep)
    # from the N bucket, so split_len (and with it the tuned config) is stable within a bucket
    splits = num_splits if num_splits is not None else _num_splits(_n_key(N), V, dev)
    split_len = triton.cdiv(triton.cdiv(V, max(splits, 1)), _SPLIT_ALIGN) * _SPLIT_ALIGN
    splits = triton.cdiv(V, split_len)
    m, s, zt, zs = (_empty((splits, N), dev) for _ in range(4))
    softcap = opts.softcap

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), splits)

    _FWD[_bits(hidden), softcap is not None][grid](
        hidden,
        weight,
        bias if bias is not None else hidden,
        target,
        rows,
        n_act,
        m,
        s,
        zt,
        zs,
        N,
        V,
        D,
        *_y_layout(target, N),
        split_len,
        1.0 if softcap is None else float(softcap),
        _n_key(N),
        HAS_BIAS=bias is not None,
        SOFTCAP=softcap is not None,
        **_kernel_flags(hidden),
    )
    lse = tu.merge_split_lse(m, s)
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    lp = torch.where(keep, zt.sum(dim=0) - lse, zero)
    sum_lp = torch.where(keep, zs.sum(dim=0) - V * lse, zero)
    lse = torch.where(keep, lse, zero)
    return lp, lse, sum_lp


def launch_backward(hidden, weight, target, bias, lse, grad_lp, grad_lse, grad_sum, opts, needs):
    """Recompute-the-logits backward; returns ``(grad_hidden, grad_weight, grad_bias)`` in the
    input dtype (None where not needed). ``grad_lse`` / ``grad_sum`` may be None. The variant
    is ``opts.triton_backward`` or ``$RAG_KERNELS_TRITON_BACKWARD`` (default
    ``"deterministic"``; see the module docstring)."""
    _check_dtype(hidden)
    need_dh, need_dw, need_db = needs
    need_dh, need_dw = bool(need_dh), bool(need_dw)
    need_db = bool(need_db) and bias is not None
    N, D = hidden.shape
    dev = hidden.device
    keep = _kept_rows(target, N, opts.ignore_index)
    zero = torch.zeros((), dtype=torch.float32, device=dev)

    def masked(g):
        return None if g is None else torch.where(keep, g.float(), zero)

    glp = masked(grad_lp)
    glse, gs = masked(grad_lse), masked(grad_sum)
    if glp is None:
        glp = torch.zeros(N, dtype=torch.float32, device=dev)
    active = glp != 0
    if glse is not None:
        active = active | (glse != 0)
    if gs is not None:
        active = active | (gs != 0)
    rows, n_act = tu.active_order(active)
    filter_eps = getattr(opts, "filter_eps", None)
    args = dict(
        hidden=hidden,
        weight=weight,
        target=target,
        bias=bias,
        active=active,
        rows=rows,
        n_act=n_act,
        lse=lse.float().contiguous(),
        glp=glp,
        glse=glse,
        gs=gs,
        softcap=opts.softcap,
        filter_eps=filter_eps if filter_eps is not None and filter_eps > 0 else None,
        needs=(need_dh, need_dw, need_db),
    )
    if tu.backward_variant(getattr(opts, "triton_backward", None)) == "atomic":
        return _backward_atomic(**args)
    return _backward_chunked(**args)


def _flags(hidden, bias, softcap, glse, gs, filter_eps) -> dict:
    return dict(
        HAS_BIAS=bias is not None,
        SOFTCAP=softcap is not None,
        HAS_GLSE=glse is not None,
        HAS_GS=gs is not None,
        FILTER=filter_eps is not None,
        **_kernel_flags(hidden),
    )


def _scalars(target, N, softcap, filter_eps) -> tuple:
    """``(Y_INNER, Y_GROUP, softcap, filter_eps)`` kernel arguments."""
    return (
        *_y_layout(target, N),
        1.0 if softcap is None else float(softcap),
        0.0 if filter_eps is None else float(filter_eps),
    )


def _backward_chunked(
    hidden, weight, target, bias, active, rows, n_act, lse, glp, glse, gs, softcap, filter_eps,
    needs,
):  # fmt: skip
    """Deterministic: per vocab chunk, dz from the kernel, then the gradient GEMMs by cuBLAS."""
    need_dh, need_dw, need_db = needs
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    dw = torch.empty_like(weight) if need_dw else None
    db = torch.empty(V, dtype=torch.float32, device=dev) if need_db else None
    if N == 0 or not any(needs):
        return (
            torch.zeros_like(hidden) if need_dh else None,
            dw.zero_() if need_dw else None,
            db.zero_().to(bias.dtype) if need_db else None,
        )
    cols = min(CHUNK_COLUMNS or tu.chunk_columns(N, N, V, hidden.element_size()), V)
    dz = _empty_dz((N, cols), dev, hidden.dtype)
    h_act = None
    if need_dw:  # inactive rows' dz is 0, but 0 * NaN is not: their rows must not be read
        h_act = torch.where(active[:, None], hidden, torch.zeros((), dtype=hidden.dtype))
    dh = None
    flags = _flags(hidden, bias, softcap, glse, gs, filter_eps)
    scalars = _scalars(target, N, softcap, filter_eps)
    kernel = _DZ[_bits(hidden), softcap is not None]
    for v0 in range(0, V, cols):
        c = min(cols, V - v0)
        buf = dz[:, :c]

        def grid(meta, c=c):
            return (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(c, meta["BLOCK_V"]),)

        kernel[grid](
            hidden,
            weight,
            bias if bias is not None else hidden,
            target,
            rows,
            n_act,
            lse,
            glp,
            glse if glse is not None else glp,
            gs if gs is not None else glp,
            dz,
            N,
            V,
            D,
            *scalars,
            v0,
            c,
            cols,
            _n_key(N),
            **flags,
        )
        if need_dh:
            part = tu.mm_f32(buf, weight[v0 : v0 + c])
            dh = part if dh is None else dh.add_(part)
        if need_dw:
            tu.mm_into(buf.t(), h_act, dw[v0 : v0 + c])
        if need_db:
            db[v0 : v0 + c] = buf.sum(dim=0, dtype=torch.float32)
    return (
        dh.to(hidden.dtype) if need_dh else None,
        dw,
        db.to(bias.dtype) if need_db else None,
    )


def _backward_atomic(
    hidden, weight, target, bias, active, rows, n_act, lse, glp, glse, gs, softcap, filter_eps,
    needs,
):  # fmt: skip
    """One kernel: dz in registers, dh / dW / db accumulated with fp32 atomics."""
    need_dh, need_dw, need_db = needs
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    dummy = torch.zeros(1, dtype=torch.float32, device=dev)
    dh = torch.zeros(N, D, dtype=torch.float32, device=dev) if need_dh else dummy
    dw = torch.zeros(V, D, dtype=torch.float32, device=dev) if need_dw else dummy.clone()
    db = torch.zeros(V, dtype=torch.float32, device=dev) if need_db else dummy.clone()
    if N > 0 and any(needs):

        def grid(meta):
            return (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(V, meta["BLOCK_V"]),)

        _BWD[_bits(hidden), softcap is not None][grid](
            hidden,
            weight,
            bias if bias is not None else hidden,
            target,
            rows,
            n_act,
            lse,
            glp,
            glse if glse is not None else glp,
            gs if gs is not None else glp,
            dh,
            dw,
            db,
            N,
            V,
            D,
            *_scalars(target, N, softcap, filter_eps),
            _n_key(N),
            NEED_DH=need_dh,
            NEED_DW=need_dw,
            NEED_DB=need_db,
            **_flags(hidden, bias, softcap, glse, gs, filter_eps),
        )
    return (
        dh.to(hidden.dtype) if need_dh else None,
        dw.to(weight.dtype) if need_dw else None,
        db.to(bias.dtype) if need_db else None,
    )


# ----------------------------------------------------------------- torch ops (torch.compile)
# The launchers above as opaque torch ops (registry.launcher_op), each with its fake next to it;
# forward / backward (LinearLogprobFunction's kernel interface) call them.


def _opts(ignore_index, softcap, filter_eps=None, triton_backward=None):
    from . import LinearLogprobOptions

    return LinearLogprobOptions(ignore_index, softcap, filter_eps, triton_backward)


def _c(t):
    return None if t is None else t.contiguous()


@registry.launcher_op("linear_logprob_fwd_triton")
def linear_logprob_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    softcap: float | None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.rag_kernels.linear_logprob_fwd_triton``: :func:`launch_forward`."""
    return launch_forward(
        hidden.contiguous(), weight.contiguous(), target.contiguous(), _c(bias),
        _opts(ignore_index, softcap), num_splits=num_splits,
    )  # fmt: skip


@linear_logprob_fwd.register_fake
def _(hidden, weight, target, bias, ignore_index, softcap, num_splits=None):
    return tuple(hidden.new_empty(hidden.shape[0], dtype=torch.float32) for _ in range(3))


@registry.launcher_op("linear_logprob_bwd_triton")
def linear_logprob_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    grad_lp: torch.Tensor | None,
    grad_lse: torch.Tensor | None,
    grad_sum: torch.Tensor | None,
    ignore_index: int,
    softcap: float | None,
    filter_eps: float | None,
    triton_backward: str | None,
    need_dh: bool,
    need_dw: bool,
    need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.rag_kernels.linear_logprob_bwd_triton``: :func:`launch_backward`; a
    gradient that is not needed (``db`` without a bias) comes back as an empty ``[0]``."""
    grads = launch_backward(
        hidden.contiguous(), weight.contiguous(), target.contiguous(), _c(bias),
        lse.contiguous(), _c(grad_lp), _c(grad_lse), _c(grad_sum),
        _opts(ignore_index, softcap, filter_eps, triton_backward), (need_dh, need_dw, need_db),
    )  # fmt: skip
    return tuple(hidden.new_empty(0) if g is None else g for g in grads)


@linear_logprob_bwd.register_fake
def _(hidden, weight, target, bias, lse, grad_lp, grad_lse, grad_sum, ignore_index, softcap,
      filter_eps, triton_backward, need_dh, need_dw, need_db):  # fmt: skip
    return (
        hidden.new_empty(hidden.shape if need_dh else (0,)),
        weight.new_empty(weight.shape) if need_dw else hidden.new_empty(0),
        bias.new_empty(bias.shape) if need_db and bias is not None else hidden.new_empty(0),
    )


def forward(hidden, weight, target, bias, opts, *, num_splits: int | None = None):
    """``(lp, lse, sum_logprob)`` through the registered op (see :func:`launch_forward`)."""
    return torch.ops.rag_kernels.linear_logprob_fwd_triton(
        hidden, weight, target, bias, opts.ignore_index, opts.softcap, num_splits
    )


def backward(hidden, weight, target, bias, lse, grad_lp, grad_lse, grad_sum, opts, needs):
    """``(grad_hidden, grad_weight, grad_bias)`` through the registered op (see
    :func:`launch_backward`); None where ``needs`` says a gradient is not needed."""
    need_dh, need_dw, need_db = (bool(x) for x in needs)
    need_db = need_db and bias is not None
    filter_eps = getattr(opts, "filter_eps", None)
    dh, dw, db = torch.ops.rag_kernels.linear_logprob_bwd_triton(
        hidden, weight, target, bias, lse, grad_lp, grad_lse, grad_sum, opts.ignore_index,
        opts.softcap, None if filter_eps is None else float(filter_eps),
        getattr(opts, "triton_backward", None), need_dh, need_dw, need_db,
    )  # fmt: skip
    return dh if need_dh else None, dw if need_dw else None, db if need_db else None
