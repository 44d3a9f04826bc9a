"""Triton device helpers shared by the ops' kernels (``@triton.jit`` functions, inlined).

* :func:`dot` — ``tl.dot`` with fp32 accumulation; ``UPCAST`` multiplies in fp32 (the CPU
  interpreter mis-computes 16-bit dots, so there operands are upcast after rounding).
* :func:`round_to` — round to the input dtype (round-to-nearest-even, as the GPU's ``cvt.rn``).
* :func:`tanh` — exp-based tanh (no libdevice) for the logit softcap.
* :func:`logit_tile` — a ``[rows, BLOCK_V]`` tile of LM-head logits ``h W^T (+ b)``, softcapped.
* :func:`accumulate_grads` — backward of a logit tile: ``dz^T h`` into dW, ``dz W`` into dh.

Used by ``linear_logprob/triton.py`` and ``token_smoothing/triton.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return out


@triton.jit
def round_to(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """``x`` rounded to the input dtype (round-to-nearest-even, as the GPU's cvt.rn does).

    The 3.9 interpreter truncates fp32 -> bf16 casts, so there the rounding is done on the
    bits and the (exactly representable) result stays fp32 for the upcast ``dot``.
    """
    if UPCAST:
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            out = bits.to(tl.float32, bitcast=True)
        else:
            out = x.to(DTYPE)
    else:
        out = x.to(DTYPE)
    return out


@triton.jit
def accumulate_grads(
    dz,
    h_ptr,
    w_ptr,
    dh_ptr,
    dw_ptr,
    hrow,
    row_ok,
    offs_v,
    v_ok,
    D,
    k_stop,
    NEED_DH: tl.constexpr,
    NEED_DW: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Backward of a logit tile ``z = h W^T``: from ``dz [BLOCK_R, BLOCK_V]`` add
    ``dz^T h`` into ``dW`` and ``dz W`` into ``dh`` (fp32 buffers, relaxed atomics), walking
    the hidden dim in ``BLOCK_K`` chunks up to ``k_stop`` (``D``, or 0 to skip the tile).
    ``hrow`` / ``row_ok``: the rows' element offsets into ``h`` / ``dh`` and validity. ``dz`` is
    rounded to the input dtype first, as plain PyTorch's bf16 / fp16 path rounds it.
    Shared by the linear_logprob and token-smoothing backward kernels."""
    dz_c = round_to(dz, h_ptr.dtype.element_ty, UPCAST)
    offs_k = tl.arange(0, BLOCK_K)
    wrow = offs_v.to(tl.int64) * D
    for k0 in range(0, k_stop, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < D
        if NEED_DW:
            h = tl.load(
                h_ptr + hrow[:, None] + kk[None, :],
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            dw = dot(
                tl.trans(dz_c),
                h,
                tl.zeros((BLOCK_V, BLOCK_K), dtype=tl.float32),
                INPUT_PRECISION,
                UPCAST,
            )
            tl.atomic_add(
                dw_ptr + wrow[:, None] + kk[None, :],
                dw,
                mask=v_ok[:, None] & k_ok[None, :],
                sem="relaxed",
            )
        if NEED_DH:
            w = tl.load(
                w_ptr + wrow[:, None] + kk[None, :],
                mask=v_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            dh = dot(
                dz_c,
                w,
                tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32),
                INPUT_PRECISION,
                UPCAST,
            )
            tl.atomic_add(
                dh_ptr + hrow[:, None] + kk[None, :],
                dh,
                mask=row_ok[:, None] & k_ok[None, :],
                sem="relaxed",
            )


@triton.jit
def tanh(x):
    # exp-based so it needs no libdevice; |error| ~ 1e-7 absolute in fp32.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def logit_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    hrow,
    row_ok,
    offs_v,
    v_ok,
    D,
    softcap,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``[BLOCK_N, BLOCK_V]`` fp32 logits (bias, softcap applied); inactive rows read as 0."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    wrow = offs_v.to(tl.int64) * D
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < D
        h = tl.load(
            h_ptr + hrow[:, None] + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        wt = tl.load(
            w_ptr + wrow[None, :] + kk[:, None], mask=v_ok[None, :] & k_ok[:, None], other=0.0
        )
        acc = dot(h, wt, acc, INPUT_PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=v_ok, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        acc = softcap * tanh(acc / softcap)
    return acc
