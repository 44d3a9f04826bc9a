"""Binding of the compiled C++ contrastive kernels (csrc/contrastive.cpp).

``torch.ops.rag_kernels.contrastive_fwd(q[B,D], d[M,D], scale[], pos_index[B]?, pos_mask[B,M]?,
cand_ids[M]?, id_table[B,U]?) -> (loss[B], lse[B], pos_lse[B])`` and
``contrastive_bwd(..., lse, pos_lse, grad[B], need_q, need_d) -> (dq[B,D], dd[M,D], dscale[])``
stream ``[128 x 1024]`` score blocks and never hold ``[B, M]``. float32/float64, contiguous;
``q``/``d`` are the (normalised, for cos) embeddings.
"""

from __future__ import annotations

import torch

from ..registry import cpu_available


def available() -> bool:
    return cpu_available() and hasattr(torch.ops.rag_kernels, "contrastive_fwd")


if available():

    @torch.library.register_fake("rag_kernels::contrastive_fwd")
    def _(q, d, scale, pos_index, pos_mask, cand_ids, id_table):
        B = q.shape[0]
        return q.new_empty(B), q.new_empty(B), q.new_empty(B)

    @torch.library.register_fake("rag_kernels::contrastive_bwd")
    def _(q, d, scale, pos_index, pos_mask, cand_ids, id_table, lse, pos_lse, grad, need_q, need_d):
        D = q.shape[1]
        dq = torch.empty_like(q) if need_q else q.new_empty(0, D)
        dd = torch.empty_like(d) if need_d else d.new_empty(0, D)
        return dq, dd, q.new_empty(())


def forward(q, d, scale, pos_index, pos_mask, cand_ids, id_table):
    return torch.ops.rag_kernels.contrastive_fwd(
        q, d, scale.detach().to(q.dtype), pos_index, pos_mask, cand_ids, id_table
    )


def backward(q, d, scale, pos_index, pos_mask, cand_ids, id_table, lse, pos_lse, grad, needs):
    dq, dd, dscale = torch.ops.rag_kernels.contrastive_bwd(
        q,
        d,
        scale.detach().to(q.dtype),
        pos_index,
        pos_mask,
        cand_ids,
        id_table,
        lse,
        pos_lse,
        grad.to(q.dtype).contiguous(),
        bool(needs[0]),
        bool(needs[1]),
    )
    return (dq if needs[0] else None, dd if needs[1] else None, dscale.to(scale.dtype))
