"""Marginalisation of the generator likelihood over K retrieved documents.

Math (docs/design.md §2.2), per query b, token mask ``m``, doc prior ``pi_bk = log_softmax_k s_bk``:

* RAG-Sequence: ``l_bk = sum_t m_bt lp_bkt``; ``loss_b = -logsumexp_k (pi_bk + l_bk)``;
  posterior ``w_bk = softmax_k (pi_bk + l_bk)``;
  ``dloss_b/dlp_bkt = -w_bk m_bt``; ``dloss_b/ds_bk = exp(pi_bk) - w_bk``.
* RAG-Token: ``loss_b = -sum_t m_bt logsumexp_k (pi_bk + lp_bkt)``;
  ``w_bkt = softmax_k (pi_bk + lp_bkt)``; ``dloss_b/dlp_bkt = -m_bt w_bkt``;
  ``dloss_b/ds_bk = sum_t m_bt (exp(pi_bk) - w_bkt)``.

Implementations (op contract, docs/design.md §4): ``reference.py`` (autograd through plain
PyTorch); ``cpu.py`` (C++, csrc/marginalize.cpp) and ``triton.py`` (GPU), both behind
:class:`MarginalizeFunction`: one forward pass produces the loss and both gradients, the
backward only scales them. Inputs of any float dtype are accepted and computed in fp32 (fp64
for fp64 inputs) — also under ``torch.autocast``, whose policy for log-softmax-like
reductions is fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import registry
from .. import validation as V
from .reference import (
    compute_dtype,
    posterior_reference,
    rag_sequence_loss_reference,
    rag_token_loss_reference,
)

OP = registry.register("marginalize", __name__)


@dataclass(frozen=True)
class MarginalizeOptions:
    """Non-tensor options of the marginalisation op."""

    token_mode: bool = False  # RAG-Token (per-token marginal) instead of RAG-Sequence


class MarginalizeFunction(torch.autograd.Function):
    """Autograd shell of the fused kernels (``cpu.py``, ``triton.py``): a kernel module provides
    ``forward(lp[B,K,T], s[B,K], token_mask?, doc_mask?, token_mode) -> (loss[B], dloss/dlp,
    dloss/ds)``; the backward only scales the saved gradients."""

    @staticmethod
    def forward(ctx, lp, scores, token_mask, doc_mask, opts: MarginalizeOptions, kernels):
        with registry.device_guard(lp):
            loss, dlp, ds = kernels.forward(lp, scores, token_mask, doc_mask, opts.token_mode)
        ctx.save_for_backward(dlp, ds, lp, scores)  # lp, scores: for first_order_only
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dlp, ds, lp, scores = ctx.saved_tensors
        g = grad_loss.to(dlp.dtype)
        grads = (dlp * g[:, None, None], ds * g[:, None], None, None, None, None)
        return registry.first_order_only(OP, grads, (lp, scores, grad_loss))


def validate_marginalize_inputs(
    token_logprobs: torch.Tensor,
    doc_scores: torch.Tensor,
    token_mask: torch.Tensor | None,
    doc_mask: torch.Tensor | None,
    reduction: str,
    checks: V.ValueChecks,
) -> None:
    V.check_tensor("token_logprobs", token_logprobs, ndim=3)
    V.check_tensor("doc_scores", doc_scores, ndim=2)
    B, K, T = token_logprobs.shape
    V.check_num_docs("token_logprobs", token_logprobs)
    if doc_scores.shape != (B, K):
        raise ValueError(
            f"doc_scores must have shape (B, K) = {(B, K)} to match token_logprobs "
            f"{tuple(token_logprobs.shape)}, got {tuple(doc_scores.shape)}"
        )
    V.check_same_device("doc_scores", doc_scores, token_logprobs, "token_logprobs")
    V.check_mask("token_mask", token_mask, (B, T), token_logprobs)
    V.check_mask("doc_mask", doc_mask, (B, K), token_logprobs)
    V.check_choice("reduction", reduction, V.REDUCTIONS)
    V.check_doc_scores(checks, "doc_scores", doc_scores, doc_mask)


def marginalize_core(token_logprobs, doc_scores, token_mask, doc_mask, token_mode, impl):
    """Per-query loss ``[B]`` on validated inputs (no checks, no host synchronisation)."""
    impl = registry.resolve(OP, impl, token_logprobs)
    if impl == "reference":
        fn = rag_token_loss_reference if token_mode else rag_sequence_loss_reference
        return fn(token_logprobs, doc_scores, token_mask, doc_mask)
    dt = compute_dtype(token_logprobs, doc_scores)
    return MarginalizeFunction.apply(
        token_logprobs.to(dt),
        doc_scores.to(dt),
        token_mask,
        doc_mask,
        MarginalizeOptions(token_mode=bool(token_mode)),
        registry.kernels(OP, impl),
    )


def _marginalize(token_logprobs, doc_scores, token_mask, doc_mask, reduction, impl, token_mode):
    checks = V.ValueChecks()
    validate_marginalize_inputs(token_logprobs, doc_scores, token_mask, doc_mask, reduction, checks)
    checks.run()
    per_query = marginalize_core(token_logprobs, doc_scores, token_mask, doc_mask, token_mode, impl)
    return V.reduce_loss(per_query, reduction)


def rag_sequence_loss(
    token_logprobs: torch.Tensor,
    doc_scores: torch.Tensor,
    *,
    token_mask: torch.Tensor | None = None,
    doc_mask: torch.Tensor | None = None,
    reduction: str = "mean",
    impl: str = "auto",
) -> torch.Tensor:
    """RAG-Sequence negative log marginal likelihood.

    Args:
        token_logprobs: ``[B, K, T]`` log-prob of answer token t given query b and doc k.
        doc_scores: ``[B, K]`` retriever scores (logits of the document prior).
        token_mask: ``[B, T]`` bool, True for answer tokens that count (shared by the K docs).
        doc_mask: ``[B, K]`` bool, True for real (non-padding) documents.
        reduction: ``"none"`` -> ``[B]``, ``"sum"``, or ``"mean"`` over queries.
        impl: ``"auto" | "triton" | "cpu" | "reference"``.

    Returns: loss in fp32 (fp64 for fp64 inputs).
    """
    return _marginalize(token_logprobs, doc_scores, token_mask, doc_mask, reduction, impl, False)


def rag_token_loss(
    token_logprobs: torch.Tensor,
    doc_scores: torch.Tensor,
    *,
    token_mask: torch.Tensor | None = None,
    doc_mask: torch.Tensor | None = None,
    reduction: str = "mean",
    impl: str = "auto",
) -> torch.Tensor:
    """RAG-Token negative log-likelihood (documents marginalised per token).

    Same arguments and shapes as :func:`rag_sequence_loss`; the loss of query b is
    ``-sum_t m_bt logsumexp_k (log_softmax_k(s_bk) + lp_bkt)``.
    """
    return _marginalize(token_logprobs, doc_scores, token_mask, doc_mask, reduction, impl, True)


def document_posterior(
    token_logprobs: torch.Tensor,
    doc_scores: torch.Tensor,
    *,
    token_mask: torch.Tensor | None = None,
    doc_mask: torch.Tensor | None = None,
    mode: str = "sequence",
) -> torch.Tensor:
    """The document posterior (no gradient): ``[B,K]`` for sequence, ``[B,K,T]`` for token mode."""
    checks = V.ValueChecks()
    validate_marginalize_inputs(token_logprobs, doc_scores, token_mask, doc_mask, "none", checks)
    V.check_choice("mode", mode, ("sequence", "token"))
    checks.run()
    return posterior_core(token_logprobs, doc_scores, token_mask, doc_mask, mode)


def posterior_core(token_logprobs, doc_scores, token_mask, doc_mask, mode) -> torch.Tensor:
    """:func:`document_posterior` on validated inputs (no checks, no host synchronisation)."""
    with torch.no_grad():
        return posterior_reference(token_logprobs, doc_scores, token_mask, doc_mask, mode)


__all__ = [
    "rag_sequence_loss",
    "rag_token_loss",
    "document_posterior",
    "marginalize_core",
    "posterior_core",
    "MarginalizeFunction",
    "MarginalizeOptions",
]
