"""Triton kernels for the RAG-Token smoothing statistic (docs/design.md §2.3).

``out[b,t] = sum_v log sum_k exp(pi_bk + z_bkt(v) - lse_bkt)``, ``z = softcap(W h + bias)``.

Design: one program owns query b, a block of ``BT`` tokens and all ``K`` documents (padded to
``KP``, a power of two): its logit tile is one ``[KP * BT, BLOCK_V]`` GEMM tile (rows ordered
document-major), reshaped to ``[KP, BT, BLOCK_V]`` so the reduction over documents is an axis
reduction in registers — ``[K, V-tile]`` per token, never ``[B, K, T, V]``.

* ``token_smoothing_lse_kernel``: online log-sum-exp per row over the vocab tiles of one split (partials
  ``[splits, B*K*T]`` merged by two torch ops).
* ``token_smoothing_fwd_kernel``: per vocab tile ``a = pi - lse + z``, ``m = max_k a``, ``e = exp(a - m)``,
  ``s = sum_k e``; accumulates ``sum_v (m + log s)`` per token and ``wsum_k = sum_v e / s`` per
  row; partials per vocab split, summed on the host.
* Backward, ``"deterministic"`` (the default): per vocabulary chunk
  ``token_smoothing_dz_kernel`` (one program per (query, token block, vocab tile), all K
  documents) recomputes the tiles and writes
  ``dz = g (w - p wsum) (+ g^lp (1[v=y] - p))`` (times ``1 - (z/c)^2`` under softcap) for
  every row as ``[B K T, C]`` in the input dtype: zeros for dead rows (masked document,
  or zero token gradient and no own log-prob gradient at a target; blocks without a live
  row only write zeros). cuBLAS then does ``dh += dz @ W[chunk]`` (fp32 accumulator),
  ``dW[chunk] = dz^T @ h`` (dead rows of ``h`` replaced by zeros: NaN there never enters),
  ``db[chunk] = sum dz``: no atomics, bitwise reproducible, no host sync (so the GEMMs
  span all rows). The chunk width follows the memory budget of the fused LM head
  (``max(1 % of the B K T V logits, 256 MiB)``, ``triton_utils.chunk_columns``;
  ``CHUNK_COLUMNS`` overrides).
* Backward, ``"atomic"`` (``opts.triton_backward`` or ``RAG_KERNELS_TRITON_BACKWARD``):
  ``token_smoothing_bwd_kernel`` forms the same ``dz`` in registers and adds ``dz @ W`` /
  ``dz^T @ h`` into fp32 ``dh`` / ``dW`` with relaxed atomics (``db`` too), no sync.
* Both backward grids run in grouped order (``GROUP_N`` token blocks sweep the vocabulary
  together, so concurrently running programs share W tiles in L2). Token blocks with no live
  row do no recompute; rows of masked documents and of tokens with zero gradient load as
  zeros (and are zeroed for the dW GEMM), so NaN-poisoned hidden states never enter a sum.

Masked documents carry ``log_prior = -inf``. fp32 / bf16 / fp16 inputs (fp64 raises
``TypeError``: use the reference or the C++ kernel); outputs and statistics fp32. ``dz`` is
rounded to the input dtype before the gradient matmuls, as plain PyTorch's bf16 path does.
Block sizes are module attributes (tests shrink them so small shapes span several tiles);
the interpreter of triton 3.9 mis-computes ``tl.dot`` on bf16 operands, so under
``TRITON_INTERPRET=1`` operands are upcast to fp32 first (same products, fp32 accumulation).
The GPU configuration is a fixed, untuned one; it compiles for sm_90 without spills for
every feature combination and document count up to 64 (tests/test_triton_compile.py).
The host launchers :func:`launch_forward` / :func:`launch_backward` are the opaque torch ops
``torch.ops.rag_kernels.token_smoothing_fwd_triton`` / ``..._bwd_triton``
(``registry.launcher_op``, fakes next to them, at the end of this file), which ``forward`` /
``backward`` call: ``torch.compile`` records one node per launch, without a graph break, also
under ``dynamic=True`` (docs/design.md §4.2).
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
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)

# Rows (documents x tokens) per program, vocab tile, hidden chunk.
# fp32 inputs' backward kernels (IEEE fp32 FMA, no tensor cores) take a narrower vocab tile
# and hidden chunk, FP32_BWD_BLOCKS[kernel] = (BLOCK_V, BLOCK_H): the 16-bit ones spill in
# fp32. The dz kernel (a logit tile and its gradient, no second GEMM) takes the full hidden
# chunk: with (64, 32) triton 3.6 spills it at K = 1 (128 registers, 8 B of stack).
if _INTERPRET:
    ROWS, BLOCK_V, BLOCK_H, NUM_WARPS, GROUP_N = 16, 16, 16, 1, 2
    FP32_BWD_BLOCKS = {}
else:
    ROWS, BLOCK_V, BLOCK_H, NUM_WARPS, GROUP_N = 64, 128, 64, 8, 8
    FP32_BWD_BLOCKS = {"dz": (64, 64), "bwd": (64, 32)}
# A token's K documents share one program (the mixture over documents is per vocabulary
# entry), KP x BT rows. Tiles of more rows than ROWS (K > 64): per row count, (BLOCK_V, BLOCK_H,
# num_stages, fp32 backward (BLOCK_V, BLOCK_H)), the vocab tile narrowed so the [rows, BLOCK_V]
# logit tile keeps ROWS x BLOCK_V entries (offline sm_90 compiles, triton 3.6 and 3.9: no
# spills, <= 123 KB of shared memory; the default tiles spill at 128 rows and overflow the
# shared memory from 256). MAX_DOCS: the most documents the kernels take (at 512 rows the
# fp32 backward spills at every tile tried).
WIDE_TILES = {128: (64, 32, 2, (32, 32)), 256: (32, 32, 2, (16, 32))}
MAX_DOCS = 256
# Deterministic backward: vocabulary columns per chunk; None = the memory budget of
# triton_utils.chunk_columns (tests set a small width to get several chunks at tiny V).
CHUNK_COLUMNS: int | None = None


def available() -> bool:
    """True when triton imported (this module only loads then)."""
    return True


# ----------------------------------------------------------------------------- device code


@triton.jit
def _rows(pid_bt, K, T, NTB, pi_ptr, KP: tl.constexpr, BT: tl.constexpr):
    """Row coordinates of a program's ``KP * BT`` rows (document-major)."""
    b = (pid_bt // NTB).to(tl.int64)  # int64 before any product: B K T H > 2^31
    t0 = (pid_bt % NTB) * BT
    i = tl.arange(0, KP * BT)
    k = i // BT
    t = t0 + i % BT
    k_ok = k < K
    pi = tl.load(pi_ptr + b * K + k, mask=k_ok, other=float("-inf"))
    ok = k_ok & (t < T) & (pi > float("-inf"))
    flat = (b * K + k) * T + t
    return b, t0, k, t, ok, pi, flat


@triton.jit
def rows_logit_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    flat,
    ok,
    offs_v,
    v_ok,
    H,
    softcap,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    R: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``[R, BLOCK_V]`` fp32 logits (bias, softcap applied); rows not ``ok`` read as 0."""
    return logit_tile(
        h_ptr,
        w_ptr,
        b_ptr,
        flat * H,
        ok,
        offs_v,
        v_ok,
        H,
        softcap,
        HAS_BIAS,
        SOFTCAP,
        INPUT_PRECISION,
        UPCAST,
        R,
        BLOCK_V,
        BLOCK_H,
    )


@triton.jit
def token_smoothing_lse_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    pi_ptr,
    y_ptr,
    m_ptr,
    s_ptr,
    zt_ptr,
    K,
    T,
    H,
    V,
    NTB,
    N,
    split_len,
    softcap,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_Y: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    KP: tl.constexpr,
    BT: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid_bt = tl.program_id(0)
    pid_s = tl.program_id(1)
    b, t0, k, t, ok, pi, flat = _rows(pid_bt, K, T, NTB, pi_ptr, KP, BT)
    v_start = pid_s * split_len
    v_stop = tl.minimum(v_start + split_len, V)
    m = tl.full((KP * BT,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((KP * BT,), dtype=tl.float32)
    zt = tl.zeros((KP * BT,), dtype=tl.float32)
    if HAS_Y:
        y = tl.load(y_ptr + b * T + t, mask=ok, other=-1)
    for v0 in range(v_start, v_stop, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < v_stop
        z = rows_logit_tile(
            h_ptr,
            w_ptr,
            b_ptr,
            flat,
            ok,
            offs_v,
            v_ok,
            H,
            softcap,
            HAS_BIAS,
            SOFTCAP,
            INPUT_PRECISION,
            UPCAST,
            KP * BT,
            BLOCK_V,
            BLOCK_H,
        )
        if HAS_Y:
            zt += tl.sum(tl.where(offs_v[None, :] == y[:, None], z, 0.0), axis=1)
        z = tl.where(v_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # all -inf so far (a -inf bias over whole tiles): shift by 0, not by -inf (NaN)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
        m = m_new
    tl.store(m_ptr + pid_s.to(tl.int64) * N + flat, m, mask=ok)
    tl.store(s_ptr + pid_s.to(tl.int64) * N + flat, s, mask=ok)
    if HAS_Y:
        tl.store(zt_ptr + pid_s.to(tl.int64) * N + flat, zt, mask=ok)


@triton.jit
def _doc_softmax(z, c, ok, t_ok, v_ok, KP: tl.constexpr, BT: tl.constexpr, BLOCK_V: tl.constexpr):
    """``a = c + z`` (``-inf`` off ``ok`` rows / ``v_ok`` columns) reshaped ``[KP, BT, BLOCK_V]``;
    returns ``(m, e, s, valid)``: max over documents, ``exp(a - m)``, its sum, and the valid
    ``[BT, BLOCK_V]`` (token, vocab) entries."""
    a = tl.where(ok[:, None] & v_ok[None, :], z + c[:, None], float("-inf"))
    a3 = tl.reshape(a, (KP, BT, BLOCK_V))
    m = tl.max(a3, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    e = tl.exp(a3 - m_safe[None, :, :])
    s = tl.sum(e, axis=0)
    # s >= 1 wherever a document is kept; elsewhere (padding, skipped tokens) make it 1 so
    # the selected-away branches stay finite. `s == 0`, not `s > 0`: a NaN (from NaN in an
    # active row or the weight) must propagate to the output.
    s = tl.where(s == 0.0, 1.0, s)
    valid = t_ok[:, None] & v_ok[None, :]
    return m, e, s, valid


@triton.jit
def token_smoothing_fwd_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    pi_ptr,
    lse_ptr,
    out_ptr,
    wsum_ptr,
    K,
    T,
    H,
    V,
    NTB,
    B,
    split_len,
    softcap,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    KP: tl.constexpr,
    BT: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid_bt = tl.program_id(0)
    pid_s = tl.program_id(1)
    b, t0, k, t, ok, pi, flat = _rows(pid_bt, K, T, NTB, pi_ptr, KP, BT)
    lse = tl.load(lse_ptr + flat, mask=ok, other=0.0)
    c = pi - lse
    tt = t0 + tl.arange(0, BT)
    t_ok = tt < T
    v_start = pid_s * split_len
    v_stop = tl.minimum(v_start + split_len, V)
    acc = tl.zeros((BT,), dtype=tl.float32)
    wacc = tl.zeros((KP, BT), dtype=tl.float32)
    for v0 in range(v_start, v_stop, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < v_stop
        z = rows_logit_tile(
            h_ptr,
            w_ptr,
            b_ptr,
            flat,
            ok,
            offs_v,
            v_ok,
            H,
            softcap,
            HAS_BIAS,
            SOFTCAP,
            INPUT_PRECISION,
            UPCAST,
            KP * BT,
            BLOCK_V,
            BLOCK_H,
        )
        m, e, s, valid = _doc_softmax(z, c, ok, t_ok, v_ok, KP, BT, BLOCK_V)
        acc += tl.sum(tl.where(valid, m + tl.log(s), 0.0), axis=1)
        r = tl.where(valid, 1.0 / s, 0.0)
        wacc += tl.sum(e * r[None, :, :], axis=2)
    tl.store(out_ptr + (pid_s.to(tl.int64) * B + b) * T + tt, acc, mask=t_ok)
    kk = tl.arange(0, KP)
    w_off = (pid_s.to(tl.int64) * B + b) * K * T + kk[:, None] * T + tt[None, :]
    tl.store(wsum_ptr + w_off, wacc, mask=(kk[:, None] < K) & t_ok[None, :])


@triton.jit
def _bwd_dz(
    h_ptr,
    w_ptr,
    b_ptr,
    lse_ptr,
    wsum_ptr,
    flat,
    ok,
    pi,
    g_row,
    y,
    glp,
    t0,
    T,
    offs_v,
    v_ok,
    H,
    softcap,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_GLP: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    KP: tl.constexpr,
    BT: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """fp32 ``dz [KP * BT, BLOCK_V]`` of the live rows ``ok`` (zeros elsewhere):
    ``g (w - p wsum) (+ glp (1[v=y] - p))``, times ``1 - (z/c)^2`` under softcap."""
    lse = tl.load(lse_ptr + flat, mask=ok, other=0.0)
    ws = tl.load(wsum_ptr + flat, mask=ok, other=0.0)
    tt = t0 + tl.arange(0, BT)
    t_ok = tt < T
    z = rows_logit_tile(
        h_ptr,
        w_ptr,
        b_ptr,
        flat,
        ok,
        offs_v,
        v_ok,
        H,
        softcap,
        HAS_BIAS,
        SOFTCAP,
        INPUT_PRECISION,
        UPCAST,
        KP * BT,
        BLOCK_V,
        BLOCK_H,
    )
    m, e, s, valid = _doc_softmax(z, pi - lse, ok, t_ok, v_ok, KP, BT, BLOCK_V)
    r = tl.where(valid, 1.0 / s, 0.0)
    w = tl.reshape(e * r[None, :, :], (KP * BT, BLOCK_V))
    p = tl.exp(z - lse[:, None])
    dz = g_row[:, None] * (w - p * ws[:, None])
    if HAS_GLP:
        is_y = (offs_v[None, :] == y[:, None]).to(tl.float32)
        dz += glp[:, None] * (is_y - p)
    if SOFTCAP:
        q = z / softcap
        dz = dz * (1.0 - q * q)
    return tl.where(ok[:, None] & v_ok[None, :], dz, 0.0)


@triton.jit
def _bwd_row_grads(g_ptr, y_ptr, glp_ptr, b, t, T, flat, ok, HAS_G: tl.constexpr,
                   HAS_GLP: tl.constexpr, R: tl.constexpr):  # fmt: skip
    """``(g_row, y, glp)`` of rows ``ok``: the token's upstream gradient, its target and the
    row's own log-prob gradient (0 where the target is ignored)."""
    if HAS_G:
        g_row = tl.load(g_ptr + b * T + t, mask=ok, other=0.0)
    else:
        g_row = tl.zeros((R,), dtype=tl.float32)
    y = tl.full((R,), -1, dtype=tl.int32)
    glp = tl.zeros((R,), dtype=tl.float32)
    if HAS_GLP:
        y = tl.load(y_ptr + b * T + t, mask=ok, other=-1)
        glp = tl.load(glp_ptr + flat, mask=ok, other=0.0)
        glp = tl.where(y >= 0, glp, 0.0)
    return g_row, y, glp


@triton.jit
def token_smoothing_dz_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    pi_ptr,
    lse_ptr,
    wsum_ptr,
    g_ptr,
    y_ptr,
    glp_ptr,
    live_ptr,
    dz_ptr,
    K,
    T,
    H,
    NTB,
    NBT,
    softcap,
    v0,
    c_len,
    dz_stride,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_G: tl.constexpr,
    HAS_GLP: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    KP: tl.constexpr,
    BT: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    """``dz[r, j]`` (input dtype) of every row r = (b, k, t) at vocab ids ``v0 + j``,
    ``j < c_len``: the live rows' gradient (``live[r]``), zeros elsewhere; ``NBT = B * NTB``
    token blocks; blocks without a live row only write zeros."""
    pid_bt, pid_v = swizzle(tl.program_id(0), NBT, tl.cdiv(c_len, BLOCK_V), GROUP_N)
    b, t0, k, t, ok, pi, flat = _rows(pid_bt, K, T, NTB, pi_ptr, KP, BT)
    real = (k < K) & (t < T)
    ok = ok & (tl.load(live_ptr + flat, mask=ok, other=0) != 0)
    offs_c = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    c_ok = offs_c < c_len
    dz = tl.zeros((KP * BT, BLOCK_V), dtype=tl.float32)
    if tl.max(ok.to(tl.int32), axis=0) > 0:
        g_row, y, glp = _bwd_row_grads(
            g_ptr, y_ptr, glp_ptr, b, t, T, flat, ok, HAS_G, HAS_GLP, KP * BT
        )
        dz = _bwd_dz(
            h_ptr, w_ptr, b_ptr, lse_ptr, wsum_ptr, flat, ok, pi, g_row, y, glp, t0, T,
            v0 + offs_c, c_ok, H, softcap, HAS_BIAS, SOFTCAP, HAS_GLP, INPUT_PRECISION, UPCAST,
            KP, BT, BLOCK_V, BLOCK_H,
        )  # fmt: skip
    out = (dz_ptr + flat * dz_stride)[:, None] + offs_c[None, :]  # flat is int64
    dz = round_to(dz, dz_ptr.dtype.element_ty, UPCAST).to(dz_ptr.dtype.element_ty)
    tl.store(out, dz, mask=real[:, None] & c_ok[None, :])


@triton.jit
def token_smoothing_bwd_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    pi_ptr,
    lse_ptr,
    wsum_ptr,
    g_ptr,
    y_ptr,
    glp_ptr,
    dh_ptr,
    dw_ptr,
    db_ptr,
    K,
    T,
    H,
    V,
    NTB,
    NBT,
    softcap,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_G: tl.constexpr,
    HAS_GLP: tl.constexpr,
    NEED_DH: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    KP: tl.constexpr,
    BT: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    """The atomic backward: dz in registers, dh / dW / db by fp32 atomics."""
    pid_bt, pid_v = swizzle(tl.program_id(0), NBT, tl.cdiv(V, BLOCK_V), GROUP_N)
    b, t0, k, t, ok, pi, flat = _rows(pid_bt, K, T, NTB, pi_ptr, KP, BT)
    # A row takes part when its token's upstream gradient or its own log-prob gradient (with a
    # target) is non-zero; all rows of a token with g != 0 take part together.
    g_row, y, glp = _bwd_row_grads(g_ptr, y_ptr, glp_ptr, b, t, T, flat, ok, HAS_G, HAS_GLP,
                                   KP * BT)  # fmt: skip
    ok = ok & ((g_row != 0.0) | (glp != 0.0))
    if tl.max(ok.to(tl.int32), axis=0) > 0:
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
        dz = _bwd_dz(
            h_ptr, w_ptr, b_ptr, lse_ptr, wsum_ptr, flat, ok, pi, g_row, y, glp, t0, T,
            offs_v, v_ok, H, softcap, HAS_BIAS, SOFTCAP, HAS_GLP, INPUT_PRECISION, UPCAST,
            KP, BT, BLOCK_V, BLOCK_H,
        )  # fmt: skip
        if NEED_DB:
            tl.atomic_add(db_ptr + offs_v, tl.sum(dz, axis=0), mask=v_ok, sem="relaxed")
        accumulate_grads(
            dz, h_ptr, w_ptr, dh_ptr, dw_ptr, flat * H, ok, offs_v, v_ok, H, H,
            NEED_DH, NEED_DW, INPUT_PRECISION, UPCAST, KP * BT, BLOCK_V, BLOCK_H,
        )  # fmt: skip


# ------------------------------------------------------------------------------- host code


def _check_dtype(hidden: torch.Tensor) -> None:
    if hidden.dtype not in _SUPPORTED:
        raise TypeError(
            "hidden must have dtype float32, bfloat16 or float16 for impl='triton', "
            f"got {hidden.dtype} (use impl='cpu' or impl='reference' for float64)"
        )


def _flags(hidden: torch.Tensor, bias, softcap) -> dict:
    return {
        "HAS_BIAS": bias is not None,
        "SOFTCAP": softcap is not None,
        "INPUT_PRECISION": "ieee" if hidden.dtype == torch.float32 else "tf32",
        "UPCAST": _INTERPRET,
    }


def _blocks(K: int, T: int) -> tuple[int, int]:
    """``(KP, BT)``: documents padded to a power of two, tokens per program."""
    if K > MAX_DOCS:
        raise ValueError(
            f"hidden has K={K} documents per query; token smoothing's Triton kernels take at most "
            f"{MAX_DOCS} (a token's documents share one program). Retrieve fewer documents, or "
            "pass impl='reference' (it materialises the [B, K, T, V] logits)"
        )
    kp = triton.next_power_of_2(max(K, 1))
    bt = max(1, ROWS // kp)
    bt = min(bt, triton.next_power_of_2(max(T, 1)))
    if not _INTERPRET:
        bt = max(bt, triton.cdiv(16, kp))  # tl.dot needs at least 16 rows
    return kp, bt


def launch_meta(K: int, T: int, kernel: str = "fwd", fp32: bool = False) -> dict:
    """The launch configuration of ``kernel`` (``"fwd"``: the forward's two, ``"dz"``: the
    deterministic backward's, ``"bwd"``: the atomic backward) for ``K`` documents and ``T``
    tokens: the block constexprs (``KP, BT, BLOCK_V, BLOCK_H``, and ``GROUP_N`` for the
    backward kernels) and ``num_warps`` / ``num_stages`` (also what
    tests/test_triton_compile.py compiles)."""
    if kernel not in ("fwd", "dz", "bwd"):
        raise ValueError(f"kernel must be 'fwd', 'dz' or 'bwd', got {kernel!r}")
    kp, bt = _blocks(K, T)
    meta = dict(KP=kp, BT=bt, BLOCK_V=BLOCK_V, BLOCK_H=BLOCK_H, num_warps=NUM_WARPS)
    fp32_bwd = FP32_BWD_BLOCKS.get(kernel)
    wide = None if _INTERPRET else WIDE_TILES.get(kp * bt)
    if wide is not None:
        meta["BLOCK_V"], meta["BLOCK_H"], meta["num_stages"], fp32_bwd = wide
    if kernel == "fwd":
        return meta
    if fp32 and fp32_bwd is not None:
        meta["BLOCK_V"], meta["BLOCK_H"] = fp32_bwd
    return dict(meta, GROUP_N=GROUP_N)


def _num_splits(programs: int, V: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(2 * sms, max(programs, 1))
    return max(1, min(want, triton.cdiv(V, 4 * BLOCK_V)))


def launch_forward(hidden, weight, log_prior, bias, target, opts, *, num_splits: int | None = None):
    """``hidden [B,K,T,H]``, ``weight [V,H]``, ``log_prior [B,K]`` (-inf: masked doc),
    ``target [B,T]`` or None -> ``(out[B,T], lse[B,K,T], wsum[B,K,T], lp[B,K,T] or [0])`` fp32
    (lp 0 where target < 0 or the document is masked). ``num_splits`` (tests) overrides how
    many vocab splits share one token block."""
    _check_dtype(hidden)
    B, K, T, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    f32 = torch.float32
    pi = log_prior.to(f32).contiguous()
    meta = launch_meta(K, T)
    ntb = triton.cdiv(T, meta["BT"])
    N = B * K * T
    lp_shape = (B, K, T) if target is not None else (0,)
    if N == 0:
        return (
            torch.zeros(B, T, dtype=f32, device=dev),
            torch.zeros(B, K, T, dtype=f32, device=dev),
            torch.zeros(B, K, T, dtype=f32, device=dev),
            torch.zeros(lp_shape, dtype=f32, device=dev),
        )
    splits = num_splits if num_splits is not None else _num_splits(B * ntb, V, dev)
    split_len = triton.cdiv(triton.cdiv(V, max(splits, 1)), BLOCK_V) * BLOCK_V
    splits = triton.cdiv(V, split_len)
    softcap = opts.softcap
    cap = 1.0 if softcap is None else float(softcap)
    flags = _flags(hidden, bias, softcap)
    b_arg = bias if bias is not None else hidden

    m = torch.empty(splits, N, dtype=f32, device=dev)
    s = torch.empty(splits, N, dtype=f32, device=dev)
    has_y = target is not None
    zt = torch.empty(splits, N, dtype=f32, device=dev) if has_y else m
    y = target.to(torch.int32).contiguous() if has_y else pi
    token_smoothing_lse_kernel[(B * ntb, splits)](
        hidden,
        weight,
        b_arg,
        pi,
        y,
        m,
        s,
        zt,
        K,
        T,
        H,
        V,
        ntb,
        N,
        split_len,
        cap,
        HAS_Y=has_y,
        **flags,
        **meta,
    )
    kept = (pi > float("-inf"))[:, :, None].expand(B, K, T).reshape(-1)
    lse = tu.merge_split_lse(m, s)
    # Masked documents' entries were never written: select, never compute with them.
    zero = torch.zeros((), dtype=f32, device=dev)
    if has_y:
        with_y = kept & (target >= 0)[:, None, :].expand(B, K, T).reshape(-1)
        lp = torch.where(with_y, zt.sum(dim=0) - lse, zero).view(B, K, T)
    else:
        lp = torch.zeros(0, dtype=f32, device=dev)
    lse = torch.where(kept, lse, zero).view(B, K, T)

    out_p = torch.empty(splits, B, T, dtype=f32, device=dev)
    wsum_p = torch.empty(splits, B, K, T, dtype=f32, device=dev)
    token_smoothing_fwd_kernel[(B * ntb, splits)](
        hidden,
        weight,
        b_arg,
        pi,
        lse,
        out_p,
        wsum_p,
        K,
        T,
        H,
        V,
        ntb,
        B,
        split_len,
        cap,
        **flags,
        **meta,
    )
    return out_p.sum(dim=0), lse, wsum_p.sum(dim=0), lp


def _empty_dz(shape, device, dtype) -> torch.Tensor:
    """The backward's dz chunk buffer, every read element written first (tests NaN-fill it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def launch_backward(
    hidden, weight, log_prior, bias, target, lse, wsum, grad_out, grad_lp, opts, needs
):
    """Recompute-the-logits backward -> ``(grad_hidden, grad_weight, grad_bias)`` in the input
    dtype (None where ``needs`` says it is not needed); ``grad_out`` / ``grad_lp`` may be None.
    The variant is ``opts.triton_backward`` or ``$RAG_KERNELS_TRITON_BACKWARD`` (default
    ``"deterministic"``; see the module docstring)."""
    _check_dtype(hidden)
    need_dh, need_dw, need_db = (bool(x) for x in needs)
    need_db = need_db and bias is not None
    B, K, T, H = hidden.shape
    dev = hidden.device
    f32 = torch.float32
    dummy = torch.zeros(1, dtype=f32, device=dev)
    has_g, has_glp = grad_out is not None, grad_lp is not None and target is not None
    args = dict(
        hidden=hidden,
        weight=weight,
        bias=bias,
        pi=log_prior.to(f32).contiguous(),
        lse=lse.to(f32).contiguous(),
        wsum=wsum.to(f32).contiguous(),
        g=grad_out.to(f32).contiguous() if has_g else None,
        y=target.to(torch.int32).contiguous() if has_glp else None,
        glp=grad_lp.to(f32).contiguous() if has_glp else None,
        softcap=opts.softcap,
        needs=(need_dh, need_dw, need_db),
        dummy=dummy,
    )
    if B * K * T == 0 or not (need_dh or need_dw or need_db) or not (has_g or has_glp):
        return (
            torch.zeros_like(hidden) if need_dh else None,
            torch.zeros_like(weight) if need_dw else None,
            torch.zeros_like(bias) if need_db else None,
        )
    if tu.backward_variant(getattr(opts, "triton_backward", None)) == "atomic":
        return _backward_atomic(**args)
    return _backward_chunked(**args)


def _live_rows(pi, g, y, glp, B, K, T) -> torch.Tensor:
    """``[B K T]`` bool: the rows the backward kernels treat as live (same rule as in-kernel):
    a kept document and a non-zero token gradient, or a non-zero own log-prob gradient at a
    target position."""
    live = torch.zeros(B, K, T, dtype=torch.bool, device=pi.device)
    if g is not None:
        live = live | (g != 0)[:, None, :]
    if glp is not None:
        live = live | ((glp != 0) & (y >= 0)[:, None, :])
    return (live & (pi > float("-inf"))[:, :, None]).reshape(-1)


def _backward_chunked(hidden, weight, bias, pi, lse, wsum, g, y, glp, softcap, needs, dummy):
    """Deterministic: per vocab chunk, dz of every row from the kernel, then cuBLAS."""
    need_dh, need_dw, need_db = needs
    B, K, T, H = hidden.shape
    V = weight.shape[0]
    N = B * K * T
    dev = hidden.device
    live = _live_rows(pi, g, y, glp, B, K, T)
    dw = torch.empty_like(weight) if need_dw else None
    db = torch.empty(V, dtype=torch.float32, device=dev) if need_db else None
    cols = min(CHUNK_COLUMNS or tu.chunk_columns(N, N, V, hidden.element_size()), V)
    dz = _empty_dz((N, cols), dev, hidden.dtype)
    h2 = hidden.view(N, H)
    h_act = None
    if need_dw:  # dead rows' dz is 0, but 0 * NaN is not: their rows must not be read
        h_act = torch.where(live[:, None], h2, torch.zeros((), dtype=h2.dtype))
    meta = launch_meta(K, T, "dz", fp32=hidden.dtype == torch.float32)
    ntb = triton.cdiv(T, meta["BT"])
    flags = _flags(hidden, bias, softcap)
    dh = None
    for v0 in range(0, V, cols):
        c = min(cols, V - v0)
        buf = dz[:, :c]
        token_smoothing_dz_kernel[(B * ntb * triton.cdiv(c, meta["BLOCK_V"]),)](
            hidden,
            weight,
            bias if bias is not None else hidden,
            pi,
            lse,
            wsum,
            g if g is not None else dummy,
            y if y is not None else dummy,
            glp if glp is not None else dummy,
            live,
            dz,
            K,
            T,
            H,
            ntb,
            B * ntb,
            1.0 if softcap is None else float(softcap),
            v0,
            c,
            cols,
            HAS_G=g is not None,
            HAS_GLP=glp is not None,
            **flags,
            **meta,
        )
        if need_dh:
            part = tu.mm_f32(buf, weight[v0 : v0 + c])
            dh = part if dh is None else dh.add_(part)
        if need_dw:
            tu.mm_into(buf.t(), h_act, dw[v0 : v0 + c])
        if need_db:
            db[v0 : v0 + c] = buf.sum(dim=0, dtype=torch.float32)
    return (
        dh.to(hidden.dtype).view(B, K, T, H) if need_dh else None,
        dw,
        db.to(bias.dtype) if need_db else None,
    )


def _backward_atomic(hidden, weight, bias, pi, lse, wsum, g, y, glp, softcap, needs, dummy):
    """One kernel: dz in registers, dh / dW / db accumulated with fp32 atomics."""
    need_dh, need_dw, need_db = needs
    B, K, T, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    f32 = torch.float32
    dh = torch.zeros(B, K, T, H, dtype=f32, device=dev) if need_dh else dummy
    dw = torch.zeros(V, H, dtype=f32, device=dev) if need_dw else dummy.clone()
    db = torch.zeros(V, dtype=f32, device=dev) if need_db else dummy.clone()
    meta = launch_meta(K, T, "bwd", fp32=hidden.dtype == torch.float32)
    ntb = triton.cdiv(T, meta["BT"])
    token_smoothing_bwd_kernel[(B * ntb * triton.cdiv(V, meta["BLOCK_V"]),)](
        hidden,
        weight,
        bias if bias is not None else hidden,
        pi,
        lse,
        wsum,
        g if g is not None else dummy,
        y if y is not None else dummy,
        glp if glp is not None else dummy,
        dh,
        dw,
        db,
        K,
        T,
        H,
        V,
        ntb,
        B * ntb,
        1.0 if softcap is None else float(softcap),
        HAS_G=g is not None,
        HAS_GLP=glp is not None,
        NEED_DH=need_dh,
        NEED_DW=need_dw,
        NEED_DB=need_db,
        **_flags(hidden, bias, softcap),
        **meta,
    )
    return (
        dh.to(hidden.dtype) if need_dh else None,
        dw.to(weight.dtype) if need_dw else None,
        db.to(bias.dtype) if need_db else None,
    )


# ----------------------------------------------------------------- torch ops (torch.compile)
# The launchers above as opaque torch ops (registry.launcher_op), each with its fake next to it;
# forward / backward (TokenSmoothingFunction's kernel interface) call them.


def _opts(softcap, triton_backward=None):
    from . import TokenSmoothingOptions

    return TokenSmoothingOptions(softcap=softcap, triton_backward=triton_backward)


def _c(t):
    return None if t is None else t.contiguous()


@registry.launcher_op("token_smoothing_fwd_triton")
def token_smoothing_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    log_prior: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor | None,
    softcap: float | None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.rag_kernels.token_smoothing_fwd_triton``: :func:`launch_forward`."""
    return launch_forward(
        hidden.contiguous(), weight.contiguous(), log_prior.contiguous(), _c(bias), _c(target),
        _opts(softcap), num_splits=num_splits,
    )  # fmt: skip


@token_smoothing_fwd.register_fake
def _(hidden, weight, log_prior, bias, target, softcap, num_splits=None):
    B, K, T, _ = hidden.shape
    f32 = torch.float32
    lp_shape = (B, K, T) if target is not None else (0,)
    return (
        hidden.new_empty((B, T), dtype=f32),
        hidden.new_empty((B, K, T), dtype=f32),
        hidden.new_empty((B, K, T), dtype=f32),
        hidden.new_empty(lp_shape, dtype=f32),
    )


@registry.launcher_op("token_smoothing_bwd_triton")
def token_smoothing_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    log_prior: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor | None,
    lse: torch.Tensor,
    wsum: torch.Tensor,
    grad_out: torch.Tensor | None,
    grad_lp: torch.Tensor | None,
    softcap: float | None,
    triton_backward: str | None,
    need_dh: bool,
    need_dw: bool,
    need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.rag_kernels.token_smoothing_bwd_triton``: :func:`launch_backward`; a
    gradient that is not needed (``db`` without a bias) comes back as an empty ``[0]``."""
    grads = launch_backward(
        hidden.contiguous(), weight.contiguous(), log_prior.contiguous(), _c(bias), _c(target),
        lse.contiguous(), wsum.contiguous(), _c(grad_out), _c(grad_lp),
        _opts(softcap, triton_backward), (need_dh, need_dw, need_db),
    )  # fmt: skip
    return tuple(hidden.new_empty(0) if g is None else g for g in grads)


@token_smoothing_bwd.register_fake
def _(hidden, weight, log_prior, bias, target, lse, wsum, grad_out, grad_lp, softcap,
      triton_backward, need_dh, need_dw, need_db):  # fmt: skip
    return (
        hidden.new_empty(hidden.shape if need_dh else (0,)),
        weight.new_empty(weight.shape) if need_dw else hidden.new_empty(0),
        bias.new_empty(bias.shape) if need_db and bias is not None else hidden.new_empty(0),
    )


def forward(hidden, weight, log_prior, bias, target, opts, *, num_splits: int | None = None):
    """``(out, lse, wsum, lp)`` through the registered op (see :func:`launch_forward`)."""
    return torch.ops.rag_kernels.token_smoothing_fwd_triton(
        hidden, weight, log_prior, bias, target, opts.softcap, num_splits
    )


def backward(hidden, weight, log_prior, bias, target, lse, wsum, grad_out, grad_lp, opts, needs):
    """``(grad_hidden, grad_weight, grad_bias)`` through the registered op (see
    :func:`launch_backward`); None where ``needs`` says a gradient is not needed."""
    need_dh, need_dw, need_db = (bool(x) for x in needs)
    need_db = need_db and bias is not None
    dh, dw, db = torch.ops.rag_kernels.token_smoothing_bwd_triton(
        hidden, weight, log_prior, bias, target, lse, wsum, grad_out, grad_lp, opts.softcap,
        getattr(opts, "triton_backward", None), need_dh, need_dw, need_db,
    )  # fmt: skip
    return dh if need_dh else None, dw if need_dw else None, db if need_db else None
