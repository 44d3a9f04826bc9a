"""Plain-PyTorch RAG-Token smoothing statistic: materialises the ``[B, K, T, V]`` logits.

``out[b,t] = sum_v log sum_k exp(pi_bk + log p_bkt(v))`` with ``pi = log_softmax_k`` of the
unmasked doc scores and ``p_bkt = softmax_v`` of the LM-head logits. The readable ground
truth for the fused kernels, differentiable and float64-capable.
"""

from __future__ import annotations

import torch

from ..linear_logprob.reference import logits_reference


def compute_dtype(hidden: torch.Tensor, doc_scores: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (hidden.dtype, doc_scores.dtype) else torch.float32


def token_smoothing_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    doc_scores: torch.Tensor,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    doc_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``hidden [B,K,T,H]``, ``weight [V,H]``, ``doc_scores [B,K]`` -> ``[B,T]``."""
    B, K, T, H = hidden.shape
    dt = compute_dtype(hidden, doc_scores)
    dev = hidden.device
    if doc_mask is not None:
        # Zero masked documents' rows first: whatever they hold (NaN included) must not
        # reach the output or, through 0 * NaN in the matmul backward, dW.
        hidden = torch.where(
            doc_mask[:, :, None, None], hidden, torch.zeros((), dtype=hidden.dtype, device=dev)
        )
        doc_scores = torch.where(
            doc_mask, doc_scores.to(dt), torch.full((), float("-inf"), dtype=dt, device=dev)
        )
    log_prior = torch.log_softmax(doc_scores.to(dt), dim=-1)  # [B, K]; -inf on masked docs
    z = logits_reference(hidden.reshape(-1, H), weight, bias, softcap).to(dt)
    logp = torch.log_softmax(z, dim=-1).view(B, K, T, -1)
    # Masked documents carry a -inf prior (and finite logits), so they drop out of the sum.
    joint = logp + log_prior[:, :, None, None]
    return torch.logsumexp(joint, dim=1).sum(dim=-1)  # [B, T]
