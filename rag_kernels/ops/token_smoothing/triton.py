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
* ``token_smoothing_bwd_kernel``: one program per (query, token block, vocab tile) recomputes the tile,
  ``dz = g (w - p wsum)`` (times ``1 - (z/c)^2`` under softcap), then walks H adding
  ``dz @ W`` into fp32 ``dh`` and ``dz^T @ h`` into fp32 ``dW`` with relaxed atomics (``db``
  too), the 6NHV scheme of the fused LM head. Token blocks whose upstream gradient is all zero
  do no work; rows of masked documents and of tokens with zero gradient load as zeros, so
  NaN-poisoned hidden states never enter a sum.

Masked documents carry ``log_prior = -inf``. fp32 / bf16 / fp16 inputs (fp64 raises
``TypeError``: use the reference or the C++ kernel); outputs and statistics fp32. ``dz`` is
rounded to the input dtype before the gradient matmuls, as plain PyTorch's bf16 path does.
Block sizes are module attributes (tests shrink them so small shapes span several tiles);
the interpreter of triton 3.9 mis-computes ``tl.dot`` on bf16 operands, so under
``TRITON_INTERPRET=1`` operands are upcast to fp32 first (same products, fp32 accumulation).
The GPU configuration is a fixed, untuned one.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..triton_utils import accumulate_grads, logit_tile

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)

# Rows (documents x tokens) per program, vocab tile, hidden chunk.
if _INTERPRET:
    ROWS, BLOCK_V, BLOCK_H, NUM_WARPS = 16, 16, 16, 1
else:
    ROWS, BLOCK_V, BLOCK_H, NUM_WARPS = 64, 128, 64, 8


def available() -> bool:
    """True when triton imported (this module only loads then)."""
    return True


# ----------------------------------------------------------------------------- device code


@triton.jit
def _rows(pid_bt, K, T, NTB, pi_ptr, KP: tl.constexpr, BT: tl.constexpr):
    """Row coordinates of a program's ``KP * BT`` rows (document-major)."""
    b = pid_bt // NTB
    t0 = (pid_bt % NTB) * BT
    i = tl.arange(0, KP * BT)
    k = i // BT
    t = t0 + i % BT
    k_ok = k < K
    pi = tl.load(pi_ptr + b * K + k, mask=k_ok, other=float("-inf"))
    ok = k_ok & (t < T) & (pi > float("-inf"))
    flat = (b.to(tl.int64) * K + k) * T + t  # int64 before any product: B K T H > 2^31
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
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
    tl.store(m_ptr + pid_s * N + flat, m, mask=ok)
    tl.store(s_ptr + pid_s * N + flat, s, mask=ok)
    if HAS_Y:
        tl.store(zt_ptr + pid_s * N + flat, zt, mask=ok)


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
    NVB,
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
):
    pid = tl.program_id(0)
    pid_bt = pid // NVB
    pid_v = pid % NVB
    b, t0, k, t, ok, pi, flat = _rows(pid_bt, K, T, NTB, pi_ptr, KP, BT)
    # A row takes part when its token's upstream gradient or its own log-prob gradient (with a
    # target) is non-zero; all rows of a token with g != 0 take part together.
    if HAS_G:
        g_row = tl.load(g_ptr + b * T + t, mask=ok, other=0.0)
    else:
        g_row = tl.zeros((KP * BT,), dtype=tl.float32)
    live = g_row != 0.0
    if HAS_GLP:
        y = tl.load(y_ptr + b * T + t, mask=ok, other=-1)
        glp = tl.load(glp_ptr + flat, mask=ok, other=0.0)
        glp = tl.where(y >= 0, glp, 0.0)
        live = live | (glp != 0.0)
    ok = ok & live
    if tl.max(ok.to(tl.int32), axis=0) > 0:
        lse = tl.load(lse_ptr + flat, mask=ok, other=0.0)
        ws = tl.load(wsum_ptr + flat, mask=ok, other=0.0)
        tt = t0 + tl.arange(0, BT)
        t_ok = tt < T
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
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
        dz = tl.where(ok[:, None] & v_ok[None, :], dz, 0.0)
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
    kp = triton.next_power_of_2(max(K, 1))
    bt = max(1, ROWS // kp)
    bt = min(bt, triton.next_power_of_2(max(T, 1)))
    if not _INTERPRET:
        bt = max(bt, triton.cdiv(16, kp))  # tl.dot needs at least 16 rows
    return kp, bt


def _num_splits(programs: int, V: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(2 * sms, max(programs, 1))
    return max(1, min(want, triton.cdiv(V, 4 * BLOCK_V)))


def forward(hidden, weight, log_prior, bias, target, opts, *, num_splits: int | None = None):
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
    kp, bt = _blocks(K, T)
    ntb = triton.cdiv(T, bt)
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
    blocks = {"KP": kp, "BT": bt, "BLOCK_V": BLOCK_V, "BLOCK_H": BLOCK_H}

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
        **blocks,
        num_warps=NUM_WARPS,
    )
    kept = (pi > float("-inf"))[:, :, None].expand(B, K, T).reshape(-1)
    if splits == 1:
        lse = m[0] + torch.log(s[0])
    else:
        mx = m.amax(dim=0)
        lse = mx + torch.log((s * torch.exp(m - mx)).sum(dim=0))
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
        **blocks,
        num_warps=NUM_WARPS,
    )
    return out_p.sum(dim=0), lse, wsum_p.sum(dim=0), lp


def backward(hidden, weight, log_prior, bias, target, lse, wsum, grad_out, grad_lp, opts, needs):
    """Recompute-the-logits backward -> ``(grad_hidden, grad_weight, grad_bias)`` in the input
    dtype (None where ``needs`` says it is not needed); ``grad_out`` / ``grad_lp`` may be None."""
    _check_dtype(hidden)
    need_dh, need_dw, need_db = (bool(x) for x in needs)
    need_db = need_db and bias is not None
    B, K, T, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    f32 = torch.float32
    dummy = torch.zeros(1, dtype=f32, device=dev)
    dh = torch.zeros(B, K, T, H, dtype=f32, device=dev) if need_dh else dummy
    dw = torch.zeros(V, H, dtype=f32, device=dev) if need_dw else dummy.clone()
    db = torch.zeros(V, dtype=f32, device=dev) if need_db else dummy.clone()
    has_g, has_glp = grad_out is not None, grad_lp is not None and target is not None
    if B * K * T > 0 and (need_dh or need_dw or need_db) and (has_g or has_glp):
        kp, bt = _blocks(K, T)
        ntb = triton.cdiv(T, bt)
        nvb = triton.cdiv(V, BLOCK_V)
        softcap = opts.softcap
        token_smoothing_bwd_kernel[(B * ntb * nvb,)](
            hidden,
            weight,
            bias if bias is not None else hidden,
            log_prior.to(f32).contiguous(),
            lse.to(f32).contiguous(),
            wsum.to(f32).contiguous(),
            grad_out.to(f32).contiguous() if has_g else dummy,
            target.to(torch.int32).contiguous() if has_glp else dummy,
            grad_lp.to(f32).contiguous() if has_glp else dummy,
            dh,
            dw,
            db,
            K,
            T,
            H,
            V,
            ntb,
            nvb,
            1.0 if softcap is None else float(softcap),
            HAS_G=has_g,
            HAS_GLP=has_glp,
            NEED_DH=need_dh,
            NEED_DW=need_dw,
            NEED_DB=need_db,
            **_flags(hidden, bias, softcap),
            KP=kp,
            BT=bt,
            BLOCK_V=BLOCK_V,
            BLOCK_H=BLOCK_H,
            num_warps=NUM_WARPS,
        )
    return (
        dh.to(hidden.dtype) if need_dh else None,
        dw.to(weight.dtype) if need_dw else None,
        db.to(bias.dtype) if need_db else None,
    )
