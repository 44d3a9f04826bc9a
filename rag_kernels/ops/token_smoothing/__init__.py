"""RAG-Token label-smoothing statistic: ``sum_v log p_marg(v)`` per (query, token).

Math (DESIGN.md §2, RAG-Token). Per query b, answer position t and vocabulary entry v, with
LM-head logits ``z_bkt = W h_bkt (+ bias)`` (optionally softcapped ``z = c tanh(z / c)``),
``log p_bkt(v) = log_softmax_v z_bkt(v)`` and the document prior
``pi_bk = log_softmax_k s_bk`` over the unmasked documents::

    log p_marg,bt(v) = logsumexp_k (pi_bk + log p_bkt(v))
    out[b, t]        = sum_v log p_marg,bt(v)

transformers' ``RagTokenForGeneration.get_nll`` uses ``-sum_t m_bt out[b, t]`` as its
ε-smoothing term. Unlike every other statistic of the RAG losses it does not decompose into
per-row (b,k,t) quantities: the log of a sum over documents sits inside the sum over V.
Gradients: with ``w_bkt(v) = softmax_k (pi_bk + log p_bkt(v))`` and upstream ``g_bt``,
``d out / d z_bkt(v) = g_bt (w_bkt(v) - p_bkt(v) sum_u w_bkt(u))`` and
``d out / d s_bk = g_bt sum_v (w_bkt(v) - exp(pi_bk))``.

Implementations: ``reference.py`` (materialising PyTorch, float64-capable); ``cpu.py`` binds
the compiled C++ kernel when the extension provides it; ``triton.py`` holds the Triton
kernels. The fused kernels make one pass over V per (b,t) that holds all K documents'
``[K, V-tile]`` logits at once, with an online log-sum-exp per document, and recompute the
tiles in the backward; they plug in through ``_IMPLS`` with the signature of ``_reference``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import _validation as V
from ..._backend import resolve_impl
from .reference import token_smoothing_reference


@dataclass(frozen=True)
class TokenSmoothingOptions:
    """Non-tensor options of the token-smoothing op."""

    softcap: float | None = None


def _reference(hidden, weight, doc_scores, bias, doc_mask, opts: TokenSmoothingOptions):
    return token_smoothing_reference(hidden, weight, doc_scores, bias, opts.softcap, doc_mask)


# impl name -> fn(hidden[B,K,T,H], weight[V,H], doc_scores[B,K], bias|None, doc_mask|None, opts)
_IMPLS = {"reference": _reference}
try:  # compiled C++ kernels (csrc/token_smoothing.cpp), once built
    from . import cpu as _cpu_kernels

    if _cpu_kernels.available():
        _IMPLS["cpu"] = _cpu_kernels.token_smoothing_cpu
except ImportError:
    pass
try:  # Triton kernels (triton.py)
    from . import triton as _triton_kernels

    if _triton_kernels.available():
        _IMPLS["triton"] = _triton_kernels.token_smoothing_triton
except ImportError:
    pass


def validate_token_smoothing_inputs(hidden, weight, doc_scores, bias, softcap, doc_mask) -> None:
    V.check_tensor("hidden", hidden, ndim=4)
    V.check_tensor("weight", weight, ndim=2)
    V.check_tensor("doc_scores", doc_scores, ndim=2)
    B, K, T, H = hidden.shape
    if weight.shape[1] != H:
        raise ValueError(
            f"weight must have shape [V, H] with H={H} (hidden's last dim), "
            f"got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"weight must have at least one vocabulary row, got {tuple(weight.shape)}")
    if tuple(doc_scores.shape) != (B, K):
        raise ValueError(
            f"doc_scores must have shape (B, K) = {(B, K)} to match hidden {tuple(hidden.shape)}, "
            f"got {tuple(doc_scores.shape)}"
        )
    V.check_same_device("weight", weight, hidden, "hidden")
    V.check_same_dtype("weight", weight, hidden, "hidden")
    V.check_same_device("doc_scores", doc_scores, hidden, "hidden")
    if bias is not None:
        V.check_tensor("bias", bias, ndim=1)
        V.check_shape("bias", bias, (weight.shape[0],))
        V.check_same_device("bias", bias, hidden, "hidden")
        V.check_same_dtype("bias", bias, hidden, "hidden")
    if softcap is not None and (
        isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0
    ):
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
    V.check_mask("doc_mask", doc_mask, (B, K), hidden)
    V.check_doc_scores("doc_scores", doc_scores, doc_mask)


def token_smoothing(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    doc_scores: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    doc_mask: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """``sum_v log sum_k exp(pi_bk + log p_bkt(v))`` for every query b and position t.

    Args:
        hidden: ``[B, K, T, H]`` generator hidden states (query b, document k, position t).
        weight: ``[V, H]`` LM-head weight, same dtype as ``hidden``.
        doc_scores: ``[B, K]`` retriever scores (logits of the document prior).
        bias: optional ``[V]`` LM-head bias.
        softcap: optional ``c``: logits become ``c * tanh(z / c)``.
        doc_mask: ``[B, K]`` bool, True for real documents; masked documents (whatever their
            hidden states and scores hold) are left out of the prior and the sum over k.
        impl: ``"auto" | "triton" | "cpu" | "reference"``; ``"auto"`` picks triton on CUDA
            tensors and cpu on CPU tensors when those kernels are present, else the reference.

    Returns: ``[B, T]`` fp32 (fp64 when ``hidden`` or ``doc_scores`` is fp64), differentiable
    with respect to ``hidden``, ``weight``, ``bias`` and ``doc_scores``.
    """
    validate_token_smoothing_inputs(hidden, weight, doc_scores, bias, softcap, doc_mask)
    impl = resolve_impl(impl, hidden, has_triton="triton" in _IMPLS, has_cpu="cpu" in _IMPLS)
    opts = TokenSmoothingOptions(softcap=None if softcap is None else float(softcap))
    return _IMPLS[impl](hidden, weight, doc_scores, bias, doc_mask, opts)


# impl name -> fn(hidden, weight, doc_scores, target[B,T] (negative = none), bias, doc_mask, opts)
#   -> (out[B,T], lp[B,K,T]): the statistic and the target log-probs from one vocabulary pass
_LP_IMPLS = {}
for _name, _mod in (("cpu", "_cpu_kernels"), ("triton", "_triton_kernels")):
    if _name in _IMPLS:
        _LP_IMPLS[_name] = getattr(globals()[_mod], f"token_smoothing_with_logprob_{_name}")


def token_smoothing_with_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    doc_scores: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    doc_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token_smoothing(...) [B,T], lp [B,K,T])`` where ``lp`` is each document's target
    log-prob (0 at ``ignore_index``): all the LM-head work of a label-smoothed RAG-Token loss
    in one pass over the vocabulary (fused impls); the reference computes the two separately."""
    validate_token_smoothing_inputs(hidden, weight, doc_scores, bias, softcap, doc_mask)
    B, K, T, _ = hidden.shape
    V.check_index_tensor("target", target, ndim=2)
    V.check_shape("target", target, (B, T))
    V.check_targets("target", target, weight.shape[0], ignore_index)
    impl = resolve_impl(impl, hidden, has_triton="triton" in _LP_IMPLS, has_cpu="cpu" in _LP_IMPLS)
    opts = TokenSmoothingOptions(softcap=None if softcap is None else float(softcap))
    if impl == "reference":
        from ..linear_logprob import linear_logprob

        out = _IMPLS["reference"](hidden, weight, doc_scores, bias, doc_mask, opts)
        lp = linear_logprob(hidden, weight, target[:, None, :], bias=bias,
                            ignore_index=ignore_index, softcap=softcap, impl="reference")
        return out, lp
    tgt = torch.where(target == ignore_index, torch.full_like(target, -1), target)
    return _LP_IMPLS[impl](hidden, weight, doc_scores, tgt, bias, doc_mask, opts)


__all__ = ["token_smoothing", "token_smoothing_with_logprob", "TokenSmoothingOptions"]
