"""Triton kernels for the row-direction contrastive loss (same interface as ``cpu.py``).

* ``contrastive_fwd_kernel``: one program per ``BLOCK_B`` queries streams ``BLOCK_M`` candidate tiles
  (scores by ``tl.dot`` over ``BLOCK_D`` chunks), keeping the online row log-sum-exp over the
  non-excluded candidates and the positive logit (index mode) or the online log-sum-exp over
  the positives (mask mode).
* ``contrastive_bwd_dq_kernel``: per query tile, recompute each score tile, ``dS = g (softmax - target)``,
  ``dq += dS d`` and a per-program partial of ``dscale = sum dS * sim``.
* ``contrastive_bwd_dd_kernel``: per candidate tile, loop over query tiles, ``dd += dS^T q``.
Scores and accumulators in fp32; fp16/bf16 embeddings are multiplied in their dtype; fp32
uses IEEE fp32 products. Nothing of size ``B x M`` is stored. Runs on CPU tensors under
``TRITON_INTERPRET=1`` (tests) and on CUDA.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    """True when triton imported (this module only loads then)."""
    return True


@triton.jit
def _scores(
    q_ptr,
    d_ptr,
    offs_b,
    offs_m,
    B,
    M,
    D,
    scale,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
):
    """sim tile [BLOCK_B, BLOCK_M] in fp32 (0 outside the matrix)."""
    acc = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        offs_d = k0 + tl.arange(0, BLOCK_D)
        qt = tl.load(
            q_ptr + offs_b[:, None].to(tl.int64) * D + offs_d[None, :],
            mask=(offs_b[:, None] < B) & (offs_d[None, :] < D),
            other=0.0,
        )
        dt = tl.load(
            d_ptr + offs_m[:, None].to(tl.int64) * D + offs_d[None, :],
            mask=(offs_m[:, None] < M) & (offs_d[None, :] < D),
            other=0.0,
        )
        acc += tl.dot(qt, tl.trans(dt), input_precision=PREC)
    return acc


@triton.jit
def _masks(
    pos_ptr,
    mask_ptr,
    ids_ptr,
    table_ptr,
    offs_b,
    offs_m,
    B,
    M,
    U,
    MASK_MODE: tl.constexpr,
    HAS_IDS: tl.constexpr,
):
    """(is_pos, excluded) boolean tiles."""
    valid = (offs_b[:, None] < B) & (offs_m[None, :] < M)
    if MASK_MODE:
        is_pos = (
            tl.load(
                mask_ptr + offs_b[:, None].to(tl.int64) * M + offs_m[None, :], mask=valid, other=0
            )
            != 0
        )
        if HAS_IDS:
            cid = tl.load(ids_ptr + offs_m, mask=offs_m < M, other=0)
            same = (
                tl.load(
                    table_ptr + offs_b[:, None].to(tl.int64) * U + cid[None, :], mask=valid, other=0
                )
                != 0
            )
            excl = same & (~is_pos)
        else:
            excl = ~valid
    else:
        p = tl.load(pos_ptr + offs_b, mask=offs_b < B, other=-1)
        is_pos = (offs_m[None, :] == p[:, None]) & valid
        if HAS_IDS:
            cid = tl.load(ids_ptr + offs_m, mask=offs_m < M, other=0)
            key = tl.load(ids_ptr + p, mask=offs_b < B, other=0)
            excl = (cid[None, :] == key[:, None]) & (~is_pos)
        else:
            excl = ~valid
    excl = excl | (~valid)
    return is_pos & valid, excl


@triton.jit
def contrastive_fwd_kernel(
    q_ptr,
    d_ptr,
    scale_ptr,
    pos_ptr,
    mask_ptr,
    ids_ptr,
    table_ptr,
    loss_ptr,
    lse_ptr,
    plse_ptr,
    B,
    M,
    D,
    U,
    MASK_MODE: tl.constexpr,
    HAS_IDS: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    scale = tl.load(scale_ptr).to(tl.float32)
    neg_inf = float("-inf")
    m_i = tl.full((BLOCK_B,), neg_inf, tl.float32)
    l_i = tl.zeros((BLOCK_B,), tl.float32)
    pm_i = tl.full((BLOCK_B,), neg_inf, tl.float32)
    pl_i = tl.zeros((BLOCK_B,), tl.float32)
    for j0 in range(0, M, BLOCK_M):
        offs_m = j0 + tl.arange(0, BLOCK_M)
        s = scale * _scores(
            q_ptr, d_ptr, offs_b, offs_m, B, M, D, scale, BLOCK_B, BLOCK_M, BLOCK_D, PREC
        )
        is_pos, excl = _masks(
            pos_ptr, mask_ptr, ids_ptr, table_ptr, offs_b, offs_m, B, M, U, MASK_MODE, HAS_IDS
        )
        sm = tl.where(excl, neg_inf, s)
        m_new = tl.maximum(m_i, tl.max(sm, axis=1))
        shift = tl.where(m_new == neg_inf, 0.0, m_new)
        l_i = l_i * tl.exp(m_i - shift) + tl.sum(tl.exp(sm - shift[:, None]), axis=1)
        m_i = m_new
        sp = tl.where(is_pos, s, neg_inf)
        if MASK_MODE:
            pm_new = tl.maximum(pm_i, tl.max(sp, axis=1))
            pshift = tl.where(pm_new == neg_inf, 0.0, pm_new)
            pl_i = pl_i * tl.exp(pm_i - pshift) + tl.sum(tl.exp(sp - pshift[:, None]), axis=1)
            pm_i = pm_new
        else:
            pm_i = tl.maximum(pm_i, tl.max(sp, axis=1))  # the single positive logit
    ok = offs_b < B
    m_i = tl.where(ok, m_i, 0.0)  # padding rows: keep them finite (never stored)
    lse = m_i + tl.log(tl.where(ok, l_i, 1.0))
    if MASK_MODE:
        plse = tl.where(ok, pm_i, 0.0) + tl.log(tl.where(ok, pl_i, 1.0))
    else:
        plse = tl.where(ok, pm_i, 0.0)
    tl.store(loss_ptr + offs_b, lse - plse, mask=ok)
    tl.store(lse_ptr + offs_b, lse, mask=ok)
    tl.store(plse_ptr + offs_b, plse, mask=ok)


@triton.jit
def _dscores(
    q_ptr,
    d_ptr,
    scale,
    pos_ptr,
    mask_ptr,
    ids_ptr,
    table_ptr,
    lse_ptr,
    plse_ptr,
    g_ptr,
    offs_b,
    offs_m,
    B,
    M,
    D,
    U,
    MASK_MODE: tl.constexpr,
    HAS_IDS: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """(dS, sim) for one tile: dS = g (softmax - target), 0 outside the matrix."""
    sim = _scores(q_ptr, d_ptr, offs_b, offs_m, B, M, D, scale, BLOCK_B, BLOCK_M, BLOCK_D, PREC)
    s = scale * sim
    is_pos, excl = _masks(
        pos_ptr, mask_ptr, ids_ptr, table_ptr, offs_b, offs_m, B, M, U, MASK_MODE, HAS_IDS
    )
    ok = offs_b < B
    lse = tl.load(lse_ptr + offs_b, mask=ok, other=0.0)
    g = tl.load(g_ptr + offs_b, mask=ok, other=0.0)
    p = tl.where(excl, 0.0, tl.exp(s - lse[:, None]))
    if MASK_MODE:
        plse = tl.load(plse_ptr + offs_b, mask=ok, other=0.0)
        t = tl.where(is_pos, tl.exp(s - plse[:, None]), 0.0)
    else:
        t = tl.where(is_pos, 1.0, 0.0)
    ds = g[:, None] * (p - t)
    return ds, sim


@triton.jit
def contrastive_bwd_dq_kernel(
    q_ptr,
    d_ptr,
    scale_ptr,
    pos_ptr,
    mask_ptr,
    ids_ptr,
    table_ptr,
    lse_ptr,
    plse_ptr,
    g_ptr,
    dq_ptr,
    dscale_ptr,
    B,
    M,
    D,
    U,
    MASK_MODE: tl.constexpr,
    HAS_IDS: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    scale = tl.load(scale_ptr).to(tl.float32)
    dscale = tl.zeros((BLOCK_B,), tl.float32)
    for j0 in range(0, M, BLOCK_M):
        offs_m = j0 + tl.arange(0, BLOCK_M)
        ds, sim = _dscores(
            q_ptr,
            d_ptr,
            scale,
            pos_ptr,
            mask_ptr,
            ids_ptr,
            table_ptr,
            lse_ptr,
            plse_ptr,
            g_ptr,
            offs_b,
            offs_m,
            B,
            M,
            D,
            U,
            MASK_MODE,
            HAS_IDS,
            PREC,
            BLOCK_B,
            BLOCK_M,
            BLOCK_D,
        )
        dscale += tl.sum(ds * sim, axis=1)
        for k0 in range(0, D, BLOCK_D):
            offs_d = k0 + tl.arange(0, BLOCK_D)
            dt = tl.load(
                d_ptr + offs_m[:, None].to(tl.int64) * D + offs_d[None, :],
                mask=(offs_m[:, None] < M) & (offs_d[None, :] < D),
                other=0.0,
            )
            ptrs = dq_ptr + offs_b[:, None].to(tl.int64) * D + offs_d[None, :]
            msk = (offs_b[:, None] < B) & (offs_d[None, :] < D)
            acc = tl.load(ptrs, mask=msk, other=0.0)
            acc += tl.dot(ds.to(dt.dtype), dt, input_precision=PREC)
            tl.store(ptrs, acc, mask=msk)
    tl.store(dscale_ptr + pid, tl.sum(dscale, axis=0))


@triton.jit
def contrastive_bwd_dd_kernel(
    q_ptr,
    d_ptr,
    scale_ptr,
    pos_ptr,
    mask_ptr,
    ids_ptr,
    table_ptr,
    lse_ptr,
    plse_ptr,
    g_ptr,
    dd_ptr,
    B,
    M,
    D,
    U,
    MASK_MODE: tl.constexpr,
    HAS_IDS: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    scale = tl.load(scale_ptr).to(tl.float32)
    for i0 in range(0, B, BLOCK_B):
        offs_b = i0 + tl.arange(0, BLOCK_B)
        ds, sim = _dscores(
            q_ptr,
            d_ptr,
            scale,
            pos_ptr,
            mask_ptr,
            ids_ptr,
            table_ptr,
            lse_ptr,
            plse_ptr,
            g_ptr,
            offs_b,
            offs_m,
            B,
            M,
            D,
            U,
            MASK_MODE,
            HAS_IDS,
            PREC,
            BLOCK_B,
            BLOCK_M,
            BLOCK_D,
        )
        for k0 in range(0, D, BLOCK_D):
            offs_d = k0 + tl.arange(0, BLOCK_D)
            qt = tl.load(
                q_ptr + offs_b[:, None].to(tl.int64) * D + offs_d[None, :],
                mask=(offs_b[:, None] < B) & (offs_d[None, :] < D),
                other=0.0,
            )
            ptrs = dd_ptr + offs_m[:, None].to(tl.int64) * D + offs_d[None, :]
            msk = (offs_m[:, None] < M) & (offs_d[None, :] < D)
            acc = tl.load(ptrs, mask=msk, other=0.0)
            acc += tl.dot(tl.trans(ds.to(qt.dtype)), qt, input_precision=PREC)
            tl.store(ptrs, acc, mask=msk)


def _config(q: torch.Tensor, D: int):
    if q.is_cuda:
        block_d = min(128, max(16, triton.next_power_of_2(D)))
        return dict(BLOCK_B=64, BLOCK_M=64, BLOCK_D=block_d, num_warps=4)
    return dict(BLOCK_B=16, BLOCK_M=16, BLOCK_D=16)  # interpreter: small tiles, fast tests


def _common(q, d, pos_index, pos_mask, cand_ids, id_table):
    dummy = torch.zeros(1, dtype=torch.int64, device=q.device)
    mask_mode = pos_mask is not None
    args = (
        dummy if pos_index is None else pos_index,
        dummy if pos_mask is None else pos_mask.view(torch.uint8),
        dummy if cand_ids is None else cand_ids,
        dummy if id_table is None else id_table.view(torch.uint8),
    )
    U = 0 if id_table is None else id_table.shape[1]
    flags = dict(
        MASK_MODE=mask_mode,
        HAS_IDS=cand_ids is not None,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return args, U, flags


def _operands(q, d):
    """The embeddings as the kernels read them. The CPU interpreter mis-computes ``tl.dot`` on
    16-bit operands, so there they are upcast (exactly) to fp32: the same products, fp32
    accumulation, as on the tensor cores (``dS`` is then not rounded to 16 bits)."""
    if _INTERPRET and q.dtype in (torch.float16, torch.bfloat16):
        return q.float(), d.float()
    return q, d


def forward(q, d, scale, pos_index, pos_mask, cand_ids, id_table):
    B, D = q.shape
    M = d.shape[0]
    qk, dk = _operands(q, d)
    args, U, flags = _common(qk, dk, pos_index, pos_mask, cand_ids, id_table)
    cfg = _config(q, D)
    loss = torch.empty(B, dtype=torch.float32, device=q.device)
    lse = torch.empty_like(loss)
    plse = torch.empty_like(loss)
    grid = (triton.cdiv(B, cfg["BLOCK_B"]),)
    contrastive_fwd_kernel[grid](
        qk,
        dk,
        scale.detach().float().contiguous(),
        *args,
        loss,
        lse,
        plse,
        B,
        M,
        D,
        U,
        **flags,
        **cfg,
    )
    return loss, lse, plse


def backward(q, d, scale, pos_index, pos_mask, cand_ids, id_table, lse, pos_lse, grad, needs):
    B, D = q.shape
    M = d.shape[0]
    qk, dk = _operands(q, d)
    args, U, flags = _common(qk, dk, pos_index, pos_mask, cand_ids, id_table)
    cfg = _config(q, D)
    s32 = scale.detach().float().contiguous()
    g = grad.float().contiguous()
    dq = dd = dscale = None
    if needs[0] or needs[2]:
        n_prog = triton.cdiv(B, cfg["BLOCK_B"])
        dq32 = torch.zeros(B, D, dtype=torch.float32, device=q.device)
        parts = torch.empty(n_prog, dtype=torch.float32, device=q.device)
        contrastive_bwd_dq_kernel[(n_prog,)](
            qk, dk, s32, *args, lse, pos_lse, g, dq32, parts, B, M, D, U, **flags, **cfg
        )
        dq = (dq32 * s32).to(q.dtype)
        dscale = parts.sum().to(scale.dtype)
    if needs[1]:
        dd32 = torch.zeros(M, D, dtype=torch.float32, device=q.device)
        contrastive_bwd_dd_kernel[(triton.cdiv(M, cfg["BLOCK_M"]),)](
            qk, dk, s32, *args, lse, pos_lse, g, dd32, B, M, D, U, **flags, **cfg
        )
        dd = (dd32 * s32).to(d.dtype)
    return dq, dd, dscale
