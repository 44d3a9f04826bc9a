"""Triton marginalisation kernel (GPU; CPU tensors under ``TRITON_INTERPRET=1``).

One program per query b: it computes the document prior, the loss, the generator row
weights ``dloss/dlp = -posterior * mask`` and the retriever gradient ``dloss/ds``
(prior − posterior, summed over tokens in token mode) in one pass over ``lp[b]``; the
autograd backward only scales them by the upstream gradient. Same contract as the C++
kernel (``cpu.py``): ``marginalize_fwd(lp, s, token_mask, doc_mask, token_mode)``, registered
as the opaque torch op ``torch.ops.rag_kernels.marginalize_fwd_triton`` (with its fake, so
``torch.compile`` traces it without a graph break; docs/design.md §4.2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import registry


def available() -> bool:
    return True


@triton.jit
def marginalize_kernel(
    lp_ptr,
    s_ptr,
    tm_ptr,
    dm_ptr,
    loss_ptr,
    dlp_ptr,
    ds_ptr,
    K,
    T,
    HAS_TM: tl.constexpr,
    HAS_DM: tl.constexpr,
    TOKEN_MODE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    F64: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # b K T may exceed 2^31
    acc_t = tl.float64 if F64 else tl.float32
    offs_k = tl.arange(0, BLOCK_K)
    in_k = offs_k < K
    keep_k = in_k
    if HAS_DM:
        keep_k = keep_k & (tl.load(dm_ptr + b * K + offs_k, mask=in_k, other=0) != 0)
    s = tl.load(s_ptr + b * K + offs_k, mask=keep_k, other=0.0).to(acc_t)
    s = tl.where(keep_k, s, float("-inf"))
    s_max = tl.max(s, axis=0)
    log_z = s_max + tl.log(tl.sum(tl.where(keep_k, tl.exp(s - s_max), 0.0), axis=0))
    log_prior = tl.where(keep_k, s - log_z, float("-inf"))
    prior = tl.where(keep_k, tl.exp(log_prior), 0.0)
    row = lp_ptr + b * K * T + offs_k[:, None] * T
    drow = dlp_ptr + b * K * T + offs_k[:, None] * T

    if TOKEN_MODE:
        loss = tl.sum(tl.zeros([BLOCK_K], dtype=acc_t), axis=0)
        ds = tl.zeros([BLOCK_K], dtype=acc_t)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            in_t = offs_t < T
            keep_t = in_t
            if HAS_TM:
                keep_t = keep_t & (tl.load(tm_ptr + b * T + offs_t, mask=in_t, other=0) != 0)
            keep = keep_k[:, None] & keep_t[None, :]
            lp = tl.load(row + offs_t[None, :], mask=keep, other=0.0).to(acc_t)
            joint = tl.where(
                keep_k[:, None], log_prior[:, None] + tl.where(keep, lp, 0.0), float("-inf")
            )
            j_max = tl.max(joint, axis=0)
            # -inf on every document: shift by 0 so that lse = -inf (loss +inf), not NaN
            j_max = tl.where(keep_t & (j_max > float("-inf")), j_max, 0.0)
            lse = j_max + tl.log(
                tl.sum(tl.where(keep_k[:, None], tl.exp(joint - j_max[None, :]), 0.0), axis=0)
            )
            loss -= tl.sum(tl.where(keep_t, lse, 0.0), axis=0)
            w = tl.where(keep, tl.exp(joint - lse[None, :]), 0.0)
            ds += tl.sum(tl.where(keep, prior[:, None] - w, 0.0), axis=1)
            tl.store(
                drow + offs_t[None, :],
                (-w).to(dlp_ptr.dtype.element_ty),
                mask=in_k[:, None] & in_t[None, :],
            )
        tl.store(loss_ptr + b, loss.to(loss_ptr.dtype.element_ty))
        tl.store(ds_ptr + b * K + offs_k, ds.to(ds_ptr.dtype.element_ty), mask=in_k)
    else:
        ell = tl.zeros([BLOCK_K], dtype=acc_t)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            in_t = offs_t < T
            keep_t = in_t
            if HAS_TM:
                keep_t = keep_t & (tl.load(tm_ptr + b * T + offs_t, mask=in_t, other=0) != 0)
            keep = keep_k[:, None] & keep_t[None, :]
            lp = tl.load(row + offs_t[None, :], mask=keep, other=0.0).to(acc_t)
            ell += tl.sum(tl.where(keep, lp, 0.0), axis=1)
        joint = tl.where(keep_k, log_prior + ell, float("-inf"))
        j_max = tl.max(joint, axis=0)
        j_max = tl.where(j_max > float("-inf"), j_max, 0.0)  # see the token branch
        lse = j_max + tl.log(tl.sum(tl.where(keep_k, tl.exp(joint - j_max), 0.0), axis=0))
        w = tl.where(keep_k, tl.exp(joint - lse), 0.0)
        tl.store(loss_ptr + b, (-lse).to(loss_ptr.dtype.element_ty))
        tl.store(ds_ptr + b * K + offs_k, (prior - w).to(ds_ptr.dtype.element_ty), mask=in_k)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            in_t = offs_t < T
            keep_t = in_t
            if HAS_TM:
                keep_t = keep_t & (tl.load(tm_ptr + b * T + offs_t, mask=in_t, other=0) != 0)
            keep = keep_k[:, None] & keep_t[None, :]
            val = tl.where(keep, -w[:, None] + tl.zeros([BLOCK_K, BLOCK_T], dtype=acc_t), 0.0)
            tl.store(
                drow + offs_t[None, :],
                val.to(dlp_ptr.dtype.element_ty),
                mask=in_k[:, None] & in_t[None, :],
            )


MAX_BLOCK_T = 1024


def launch_tile(K: int, T: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """``(BLOCK_K, BLOCK_T, num_warps)`` of a launch: all K documents in one tile, and T in
    chunks of at most 1024 tokens so that the tile holds at most 4096 elements (1024 in
    float64) on 8 warps. Checked by offline sm_90 compiles for K = 1 ... 128, triton 3.6 and
    3.9 (tests/test_triton_compile.py): no spills (the earlier 4096-element tile on 4 warps
    spilled 200-1000 B at K = 64; 2 x 2048 spilled 8 B in bf16 under 3.6)."""
    budget = 1024 if dtype == torch.float64 else 4096
    block_k = triton.next_power_of_2(max(K, 1))
    block_t = min(triton.next_power_of_2(max(T, 1)), MAX_BLOCK_T, max(16, budget // block_k))
    return block_k, block_t, 8


@registry.launcher_op("marginalize_fwd_triton")
def marginalize_fwd(
    lp: torch.Tensor,
    scores: torch.Tensor,
    token_mask: torch.Tensor | None,
    doc_mask: torch.Tensor | None,
    token_mode: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.rag_kernels.marginalize_fwd_triton``: ``(loss[B], dloss/dlp, dloss/ds)``."""
    lp, scores = lp.contiguous(), scores.contiguous()
    B, K, T = lp.shape
    loss = lp.new_empty(B)
    dlp = torch.empty_like(lp)
    ds = torch.empty_like(scores)
    tm = token_mask.contiguous().view(torch.uint8) if token_mask is not None else lp
    dm = doc_mask.contiguous().view(torch.uint8) if doc_mask is not None else lp
    block_k, block_t, num_warps = launch_tile(K, T, lp.dtype)
    marginalize_kernel[(B,)](
        lp,
        scores,
        tm,
        dm,
        loss,
        dlp,
        ds,
        K,
        T,
        HAS_TM=token_mask is not None,
        HAS_DM=doc_mask is not None,
        TOKEN_MODE=token_mode,
        BLOCK_K=block_k,
        BLOCK_T=block_t,
        F64=lp.dtype == torch.float64,
        num_warps=num_warps,
    )
    return loss, dlp, ds


@marginalize_fwd.register_fake
def _(lp, scores, token_mask, doc_mask, token_mode):
    return lp.new_empty(lp.shape[0]), lp.new_empty(lp.shape), scores.new_empty(scores.shape)


def forward(lp, scores, token_mask, doc_mask, token_mode: bool):
    return torch.ops.rag_kernels.marginalize_fwd_triton(
        lp, scores, token_mask, doc_mask, bool(token_mode)
    )
