"""Binding of the compiled C++ marginalisation kernel (csrc/marginalize.cpp).

``torch.ops.rag_kernels.marginalize_fwd(lp[B,K,T], s[B,K], token_mask[B,T]?, doc_mask[B,K]?,
token_mode) -> (loss[B], dloss_dlp[B,K,T], dloss_ds[B,K])``: one pass computes the loss, the
generator row weights (``-posterior * mask``) and the retriever gradient (prior - posterior);
the backward only scales them by the upstream gradient. float32/float64, contiguous.
"""

from __future__ import annotations

import torch

from ..registry import cpu_available


def available() -> bool:
    """True when the compiled extension loaded and registered the marginalisation op."""
    return cpu_available() and hasattr(torch.ops.rag_kernels, "marginalize_fwd")


if available():

    @torch.library.register_fake("rag_kernels::marginalize_fwd")
    def _(lp, scores, token_mask, doc_mask, token_mode):
        B, K, _ = lp.shape
        return lp.new_empty(B), torch.empty_like(lp), torch.empty_like(scores)


def forward(lp, scores, token_mask, doc_mask, token_mode: bool):
    return torch.ops.rag_kernels.marginalize_fwd(
        lp.contiguous(),
        scores.contiguous(),
        None if token_mask is None else token_mask.contiguous(),
        None if doc_mask is None else doc_mask.contiguous(),
        token_mode,
    )
