"""Plain-PyTorch marginalisation over retrieved documents (the readable ground truth).

Notation: ``lp[b,k,t]`` token log-prob of the answer given query b and document k,
``s[b,k]`` retriever scores, ``m[b,t]`` token mask, doc mask on ``[b,k]``.

RAG-Sequence:  ``l_bk = sum_t m_bt lp_bkt``, ``pi_bk = log_softmax_k s_bk``,
               ``loss_b = -logsumexp_k (pi_bk + l_bk)``.
RAG-Token:     ``loss_b = -sum_t m_bt logsumexp_k (pi_bk + lp_bkt)``.

Masked tokens and masked documents are replaced by zeros *before* any arithmetic, so
whatever they hold (NaN included) reaches neither the loss nor the gradient.
"""

from __future__ import annotations

import torch


def compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def masked_inputs(
    token_logprobs: torch.Tensor,
    doc_scores: torch.Tensor,
    token_mask: torch.Tensor | None,
    doc_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Upcast, and zero out masked entries. Returns (lp, log_prior, keep_tok[B,1,T], keep_doc[B,K])."""
    dt = compute_dtype(token_logprobs, doc_scores)
    B, K, T = token_logprobs.shape
    dev = token_logprobs.device
    keep_tok = (
        token_mask if token_mask is not None else torch.ones(B, T, dtype=torch.bool, device=dev)
    )[:, None, :]
    keep_doc = doc_mask if doc_mask is not None else torch.ones(B, K, dtype=torch.bool, device=dev)
    keep = keep_tok & keep_doc[:, :, None]
    lp = torch.where(keep, token_logprobs.to(dt), torch.zeros((), dtype=dt, device=dev))
    s = torch.where(
        keep_doc, doc_scores.to(dt), torch.full((), float("-inf"), dtype=dt, device=dev)
    )
    log_prior = torch.log_softmax(s, dim=-1)
    return lp, log_prior, keep_tok, keep_doc


def rag_sequence_loss_reference(
    token_logprobs: torch.Tensor,
    doc_scores: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    doc_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-query RAG-Sequence loss ``[B]`` (fp32, or fp64 for fp64 inputs)."""
    lp, log_prior, _, keep_doc = masked_inputs(token_logprobs, doc_scores, token_mask, doc_mask)
    joint = log_prior + lp.sum(dim=-1)
    joint = torch.where(keep_doc, joint, torch.full_like(joint, float("-inf")))
    return -torch.logsumexp(joint, dim=-1)


def rag_token_loss_reference(
    token_logprobs: torch.Tensor,
    doc_scores: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    doc_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-query RAG-Token loss ``[B]`` (fp32, or fp64 for fp64 inputs)."""
    lp, log_prior, keep_tok, keep_doc = masked_inputs(
        token_logprobs, doc_scores, token_mask, doc_mask
    )
    joint = log_prior[:, :, None] + lp
    joint = torch.where(keep_doc[:, :, None], joint, torch.full_like(joint, float("-inf")))
    per_token = torch.logsumexp(joint, dim=1)  # [B, T]
    per_token = torch.where(keep_tok[:, 0, :], per_token, torch.zeros_like(per_token))
    return -per_token.sum(dim=-1)


def posterior_reference(
    token_logprobs: torch.Tensor,
    doc_scores: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    doc_mask: torch.Tensor | None = None,
    mode: str = "sequence",
) -> torch.Tensor:
    """Document posterior: ``[B,K]`` (sequence) or ``[B,K,T]`` (token); 0 on masked docs."""
    lp, log_prior, keep_tok, keep_doc = masked_inputs(
        token_logprobs, doc_scores, token_mask, doc_mask
    )
    if mode == "sequence":
        joint = log_prior + lp.sum(dim=-1)
        joint = torch.where(keep_doc, joint, torch.full_like(joint, float("-inf")))
        return torch.softmax(joint, dim=1)
    joint = log_prior[:, :, None] + lp
    joint = torch.where(keep_doc[:, :, None], joint, torch.full_like(joint, float("-inf")))
    return torch.softmax(joint, dim=1)
