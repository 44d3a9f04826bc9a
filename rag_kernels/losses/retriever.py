"""Retriever training objectives driven by the generator (docs/design.md §2.4).

Notation: ``s[b,k]`` retriever scores of the K retrieved documents of query b (the only
input that receives a gradient), ``g[b,k,t]`` the generator's log-prob of answer token t
given query b and document k, ``m[b,t]`` the answer-token mask, ``tau_s`` / ``tau_g`` the
retriever / generator temperatures. Every generator-side input is **detached inside the
functions** (stop-gradient): these losses train the retriever only, so a tensor passed as
``gen_logprobs`` / ``gen_scores`` / ... never receives a gradient from them.

* **EMDR²** (Singh et al. 2021, "End-to-End Training of Multi-Document Reader and
  Retriever"; the EMDR² objective as implemented in Atlas, Izacard et al. 2022):

  - token level (what the Atlas / EMDR² code computes)::

        loss = -sum_{b,t} m_bt log sum_k exp(log_softmax_k(s_bk / tau_s) + g_bkt) / sum_{b,t} m_bt

  - answer level (the paper's formula)::

        loss_b = -log sum_k p_ret(k | b) p_LM(y_b | x_b, z_k),
        p_ret = softmax_k(s / tau_s),  log p_LM(y|x,z_k) = sum_t m_bt g_bkt

  Atlas divides the LM logits by the generator temperature ``tau_g`` *before* their
  log-softmax; that happens where ``g`` is computed (e.g. ``rk.linear_logprob`` on
  ``hidden / tau_g``), so this function has no generator temperature.

* **PDist** (Atlas, "perplexity distillation"): target ``P = softmax_k(gbar_bk / tau_g)``
  with ``gbar_bk = sum_t m_bt g_bkt / sum_t m_bt`` the mean per-token log-likelihood of the
  answer given document k (:func:`mean_token_logprob`); retriever distribution
  ``log Q = log_softmax_k(s / tau_s)``; loss ``KL(P || Q)``.
* **LOOP** (Atlas, "leave-one-out perplexity distillation"): the same KL with target
  ``P = softmax_k(nll_without_k / tau_g)``, ``nll_without_k`` the answer NLL when document
  k is *removed* from the context: documents whose removal hurts most get the most mass.
* **ADist** (Atlas, "attention distillation"): the same KL with target
  ``P = softmax_k(a_bk / tau_g)``, ``a_bk`` a caller-supplied aggregate of the reader's
  cross-attention to document k.
* **LSR** (REPLUG, Shi et al. 2023, "LM-supervised retrieval"; RA-DIT, Lin et al. 2023):
  ``P_R = softmax_k(s / gamma)``, ``Q_LM = softmax_k(log p_LM(y | x, d_k) / beta)``.
  ``direction="retriever||lm"`` computes ``KL(P_R || Q_LM)``, the direction written in the
  REPLUG and RA-DIT papers; ``direction="lm||retriever"`` computes ``KL(Q_LM || P_R)``,
  which is what the public REPLUG code computes (``kl_div(log P_R, Q_LM)``) and is the same
  form as PDist. Both have gradients only through ``P_R``.

Atlas defaults: ``tau_s = tau_g = 0.01`` (the defaults of pdist/loop/adist here) and
retriever score ``q . d / sqrt(D)``.

KL reductions mirror ``torch.nn.functional.kl_div``: ``"batchmean"`` (default) = sum / B,
the per-query KL averaged over queries; ``"mean"`` = sum / number of unmasked (b, k)
entries, which without a doc mask is ``sum / (B*K)`` = batchmean / K, the reduction Atlas
uses (``nn.KLDivLoss()`` default); ``"sum"``; ``"none"`` -> ``[B]`` per-query KL (unlike
``kl_div``, which would return the ``[B, K]`` elementwise terms).

Masks: ``doc_mask[b,k] = False`` removes document k of query b from every softmax and KL:
it contributes exactly 0 and gets 0 gradient, and whatever the masked entries hold (NaN
included) cannot leak. Masked retriever scores must be finite or ``-inf`` (value check).
Results are fp32, or fp64 when any input is fp64; lower-precision inputs are upcast first.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from ..ops import validation as V
from ..ops.marginalize.reference import (
    compute_dtype,
    rag_sequence_loss_reference,
    rag_token_loss_reference,
)

KL_REDUCTIONS = ("batchmean", "mean", "sum", "none")
EMDR2_REDUCTIONS = ("mean", "sum", "none")
EMDR2_LEVELS = ("token", "answer")
LSR_DIRECTIONS = ("retriever||lm", "lm||retriever")


# ---------------------------------------------------------------------------------------
# validation and shared helpers
# ---------------------------------------------------------------------------------------


def _check_temperature(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a positive float, got {type(value).__name__}")
    # comparisons, not math.isfinite: torch.compile traces them on a symbolic float
    if not (value > 0 and value < math.inf):
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")
    return float(value)


def _check_normal_temperature(name: str, value: float, dtype: torch.dtype) -> None:
    """A temperature below the smallest normal number of the compute dtype (subnormal, or 0
    there) would make ``scores / temperature`` and its gradient overflow to inf and NaN."""
    tiny = torch.finfo(dtype).tiny
    if value < tiny:
        raise ValueError(
            f"{name} must be at least {tiny:.4g} (the smallest normal {dtype} number: the "
            f"objective computes in {dtype}), got {value!r}"
        )


def _scaled(
    x: torch.Tensor, doc_mask: torch.Tensor | None, temperature: float, dtype: torch.dtype
) -> torch.Tensor:
    """``(x - max_k x) / temperature`` over unmasked docs, ``-inf`` on masked ones: the logits
    of ``softmax_k(x / temperature)`` (shift-invariant), which never overflow to +inf however
    small the temperature (their max is 0), and whose gradient stays finite for a temperature
    the compute dtype holds as a normal number (``_check_normal_temperature``)."""
    x = x.to(dtype)
    if doc_mask is not None:
        x = torch.where(doc_mask, x, torch.full((), float("-inf"), dtype=dtype, device=x.device))
    top = x.detach().amax(dim=-1, keepdim=True)  # K >= 1 (check_num_docs)
    # a query whose scores are all -inf keeps them (its value check fails first, when on)
    top = torch.where(top == float("-inf"), torch.zeros((), dtype=dtype, device=x.device), top)
    return (x - top) / temperature


def _check_scores_pair(
    doc_scores: torch.Tensor, other: torch.Tensor, other_name: str, doc_mask: torch.Tensor | None
) -> None:
    """Structure of doc_scores [B,K], a generator-side [B,K] tensor and the mask (no sync)."""
    V.check_tensor("doc_scores", doc_scores, ndim=2)
    V.check_tensor(other_name, other, ndim=2)
    if other.shape != doc_scores.shape:
        raise ValueError(
            f"{other_name} must have the shape of doc_scores (B, K) = {tuple(doc_scores.shape)}, "
            f"got {tuple(other.shape)}"
        )
    V.check_same_device(other_name, other, doc_scores, "doc_scores")
    V.check_num_docs("doc_scores", doc_scores)
    V.check_mask("doc_mask", doc_mask, doc_scores.shape, doc_scores)


def _check_doc_scores(
    doc_scores: torch.Tensor,
    doc_mask: torch.Tensor | None,
    target: torch.Tensor | None = None,
    target_name: str = "",
) -> None:
    """The value checks of one objective call (one host synchronisation): the doc scores and,
    for a distillation target, that each query's target is finite on some unmasked document
    (softmax of all -inf is undefined: its loss was NaN) and +inf on none (a softmax of +inf is
    NaN too). A NaN target still propagates."""
    checks = V.ValueChecks()
    V.check_doc_scores(checks, "doc_scores", doc_scores, doc_mask)
    if checks.enabled and target is not None and target.numel():
        t = target.detach()
        live = t != float("-inf")
        top = t == float("inf")
        if doc_mask is not None:
            live = live & doc_mask
            top = top & doc_mask
        dead = ~live.any(dim=-1)

        def fail():
            b = int(dead.nonzero()[0, 0])
            raise ValueError(
                f"{target_name} of query {b} are -inf on every unmasked document: the target "
                "distribution over its documents is undefined"
            )

        def fail_inf():
            b, k = (int(i) for i in top.nonzero()[0])
            raise ValueError(
                f"{target_name} must be finite or -inf on unmasked documents, got +inf at "
                f"query {b}, document {k} ({int(top.sum())} such entries)"
            )

        checks.add(dead.any(), fail)
        checks.add(top.any(), fail_inf)
    checks.run()


def _masked_log_softmax(
    x: torch.Tensor, doc_mask: torch.Tensor | None, temperature: float, dtype: torch.dtype
) -> torch.Tensor:
    """``log_softmax_k(x / temperature)`` over unmasked docs; ``-inf`` on masked ones."""
    return torch.log_softmax(_scaled(x, doc_mask, temperature, dtype), dim=-1)


def _masked_kl(
    log_p: torch.Tensor, log_q: torch.Tensor, doc_mask: torch.Tensor | None, reduction: str
) -> torch.Tensor:
    """``KL(P || Q)`` over the doc axis of two ``[B,K]`` log-distributions.

    Masked docs and docs with ``P = 0`` exactly (``log_p = -inf``, e.g. masked or
    underflowed at low temperature) contribute 0 with a 0 gradient: both operands are
    replaced *before* the arithmetic so no ``0 * inf`` NaN reaches the forward or backward.
    A NaN in an unmasked entry still propagates.
    """
    active = log_p != float("-inf")
    if doc_mask is not None:
        active = active & doc_mask
    zero = torch.zeros((), dtype=log_p.dtype, device=log_p.device)
    lp = torch.where(active, log_p, zero)
    lq = torch.where(active, log_q, zero)
    per_query = torch.where(active, lp.exp() * (lp - lq), zero).sum(dim=-1)
    if reduction == "none":
        return per_query
    total = per_query.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / log_p.shape[0]
    count = doc_mask.sum() if doc_mask is not None else log_p.numel()
    return total / count


def _target_kl(
    doc_scores: torch.Tensor,
    target_scores: torch.Tensor,
    target_name: str,
    doc_mask: torch.Tensor | None,
    retriever_temperature: float,
    generator_temperature: float,
    reduction: str,
) -> torch.Tensor:
    """``KL(softmax(target / tau_g) || softmax(s / tau_s))`` with a stop-gradient target."""
    _check_scores_pair(doc_scores, target_scores, target_name, doc_mask)
    tau_s = _check_temperature("retriever_temperature", retriever_temperature)
    tau_g = _check_temperature("generator_temperature", generator_temperature)
    V.check_choice("reduction", reduction, KL_REDUCTIONS)
    _check_doc_scores(doc_scores, doc_mask, target_scores, target_name)
    dt = compute_dtype(doc_scores, target_scores)
    _check_normal_temperature("retriever_temperature", tau_s, dt)
    _check_normal_temperature("generator_temperature", tau_g, dt)
    log_p = _masked_log_softmax(target_scores.detach(), doc_mask, tau_g, dt)
    log_q = _masked_log_softmax(doc_scores, doc_mask, tau_s, dt)
    return _masked_kl(log_p, log_q, doc_mask, reduction)


# ---------------------------------------------------------------------------------------
# public objectives
# ---------------------------------------------------------------------------------------


def mean_token_logprob(
    gen_logprobs: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean per-token log-likelihood ``gbar[b,k] = sum_t m_bt g_bkt / sum_t m_bt``.

    Args:
        gen_logprobs: ``[B, K, T]`` per-document token log-probs.
        token_mask: ``[B, T]`` bool, True for answer tokens (None: all count).

    Returns: ``[B, K]`` in fp32 (fp64 for fp64 input); differentiable (no detach here).
    A query with no unmasked token gets 0. Masked tokens (NaN included) do not leak.
    """
    V.check_tensor("gen_logprobs", gen_logprobs, ndim=3)
    B, K, T = gen_logprobs.shape
    V.check_mask("token_mask", token_mask, (B, T), gen_logprobs)
    g = gen_logprobs.to(compute_dtype(gen_logprobs))
    if token_mask is None:
        return g.mean(dim=-1) if T > 0 else g.sum(dim=-1)
    keep = token_mask[:, None, :]
    total = torch.where(keep, g, torch.zeros((), dtype=g.dtype, device=g.device)).sum(dim=-1)
    return total / token_mask.sum(dim=-1, keepdim=True).clamp_min(1).to(g.dtype)


def emdr2_loss(
    doc_scores: torch.Tensor,
    gen_logprobs: torch.Tensor,
    *,
    token_mask: torch.Tensor | None = None,
    doc_mask: torch.Tensor | None = None,
    level: str = "token",
    retriever_temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """EMDR² retriever loss (gradient only into ``doc_scores``).

    Args:
        doc_scores: ``[B, K]`` retriever scores ``s``.
        gen_logprobs: ``[B, K, T]`` per-document answer token log-probs ``g`` (detached here;
            Atlas computes them from LM logits divided by ``tau_g``).
        token_mask: ``[B, T]`` bool, True for answer tokens that count.
        doc_mask: ``[B, K]`` bool, True for real documents.
        level: ``"token"`` (Atlas/EMDR² code: documents marginalised per token) or
            ``"answer"`` (paper: marginalised over the whole answer).
        retriever_temperature: ``tau_s`` in ``p_ret = softmax(s / tau_s)``.
        reduction: token level: ``"mean"`` = sum over unmasked tokens / their number
            (0 when there is none), ``"sum"``, ``"none"`` -> ``[B]`` per-query sums over
            tokens; answer level: ``"mean"`` over queries, ``"sum"``, ``"none"`` -> ``[B]``.

    Returns: fp32 loss (fp64 for fp64 inputs).
    """
    V.check_tensor("doc_scores", doc_scores, ndim=2)
    V.check_tensor("gen_logprobs", gen_logprobs, ndim=3)
    B, K, T = gen_logprobs.shape
    if doc_scores.shape != (B, K):
        raise ValueError(
            f"gen_logprobs must have shape (B, K, T) with (B, K) = {tuple(doc_scores.shape)} "
            f"from doc_scores, got {tuple(gen_logprobs.shape)}"
        )
    V.check_same_device("gen_logprobs", gen_logprobs, doc_scores, "doc_scores")
    V.check_num_docs("doc_scores", doc_scores)
    V.check_mask("token_mask", token_mask, (B, T), doc_scores)
    V.check_mask("doc_mask", doc_mask, (B, K), doc_scores)
    V.check_choice("level", level, EMDR2_LEVELS)
    V.check_choice("reduction", reduction, EMDR2_REDUCTIONS)
    tau_s = _check_temperature("retriever_temperature", retriever_temperature)
    _check_doc_scores(doc_scores, doc_mask)

    dt = compute_dtype(doc_scores, gen_logprobs)
    _check_normal_temperature("retriever_temperature", tau_s, dt)
    s = _scaled(doc_scores, doc_mask, tau_s, dt)  # log_softmax_k below: the shift cancels
    g = gen_logprobs.detach().to(dt)
    if level == "answer":
        per_query = rag_sequence_loss_reference(g, s, token_mask, doc_mask)
        if reduction == "none":
            return per_query
        return per_query.sum() if reduction == "sum" else per_query.mean()
    per_query = rag_token_loss_reference(g, s, token_mask, doc_mask)
    if reduction == "none":
        return per_query
    total = per_query.sum()
    if reduction == "sum":
        return total
    n_tokens = token_mask.sum() if token_mask is not None else B * T
    return total / (n_tokens.clamp_min(1) if torch.is_tensor(n_tokens) else max(n_tokens, 1))


def pdist_loss(
    doc_scores: torch.Tensor,
    gen_scores: torch.Tensor,
    *,
    doc_mask: torch.Tensor | None = None,
    retriever_temperature: float = 0.01,
    generator_temperature: float = 0.01,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Atlas perplexity distillation: ``KL(softmax(gbar / tau_g) || softmax(s / tau_s))``.

    Args:
        doc_scores: ``[B, K]`` retriever scores (receive the gradient).
        gen_scores: ``[B, K]`` mean per-token answer log-likelihood given each document
            (:func:`mean_token_logprob`); detached here.
        doc_mask: ``[B, K]`` bool, True for real documents.
        retriever_temperature / generator_temperature: ``tau_s`` / ``tau_g`` (Atlas: 0.01).
        reduction: ``"batchmean" | "mean" | "sum" | "none"`` (module docstring).
    """
    return _target_kl(
        doc_scores,
        gen_scores,
        "gen_scores",
        doc_mask,
        retriever_temperature,
        generator_temperature,
        reduction,
    )


def loop_loss(
    doc_scores: torch.Tensor,
    nll_without_doc: torch.Tensor,
    *,
    doc_mask: torch.Tensor | None = None,
    retriever_temperature: float = 0.01,
    generator_temperature: float = 0.01,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Atlas leave-one-out distillation: ``KL(softmax(nll_without / tau_g) || softmax(s / tau_s))``.

    ``nll_without_doc[b, k]`` (``[B, K]``, detached here) is the answer NLL of query b with
    document k removed from the context. Other arguments as :func:`pdist_loss`.
    """
    return _target_kl(
        doc_scores,
        nll_without_doc,
        "nll_without_doc",
        doc_mask,
        retriever_temperature,
        generator_temperature,
        reduction,
    )


def adist_loss(
    doc_scores: torch.Tensor,
    attention_scores: torch.Tensor,
    *,
    doc_mask: torch.Tensor | None = None,
    retriever_temperature: float = 0.01,
    generator_temperature: float = 0.01,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Atlas attention distillation: ``KL(softmax(attn / tau_g) || softmax(s / tau_s))``.

    ``attention_scores`` (``[B, K]``, detached here) is the caller's aggregate of the
    reader's cross-attention to each document. Other arguments as :func:`pdist_loss`.
    """
    return _target_kl(
        doc_scores,
        attention_scores,
        "attention_scores",
        doc_mask,
        retriever_temperature,
        generator_temperature,
        reduction,
    )


def lsr_loss(
    doc_scores: torch.Tensor,
    lm_logprobs: torch.Tensor,
    *,
    doc_mask: torch.Tensor | None = None,
    retriever_temperature: float = 1.0,
    lm_temperature: float = 1.0,
    direction: str = "retriever||lm",
    reduction: str = "batchmean",
) -> torch.Tensor:
    """REPLUG LM-supervised retrieval / RA-DIT retriever loss.

    ``P_R = softmax_k(s / gamma)`` (``gamma = retriever_temperature``),
    ``Q_LM = softmax_k(lm_logprobs / beta)`` (``beta = lm_temperature``).

    Args:
        doc_scores: ``[B, K]`` retriever scores (receive the gradient).
        lm_logprobs: ``[B, K]`` ``log p_LM(y | x, d_k)``, the answer log-likelihood given
            document k; detached here.
        doc_mask: ``[B, K]`` bool, True for real documents.
        direction: ``"retriever||lm"`` -> ``KL(P_R || Q_LM)`` (REPLUG and RA-DIT papers);
            ``"lm||retriever"`` -> ``KL(Q_LM || P_R)`` (the public REPLUG code).
        reduction: ``"batchmean" | "mean" | "sum" | "none"`` (module docstring).
    """
    _check_scores_pair(doc_scores, lm_logprobs, "lm_logprobs", doc_mask)
    gamma = _check_temperature("retriever_temperature", retriever_temperature)
    beta = _check_temperature("lm_temperature", lm_temperature)
    V.check_choice("direction", direction, LSR_DIRECTIONS)
    V.check_choice("reduction", reduction, KL_REDUCTIONS)
    _check_doc_scores(doc_scores, doc_mask, lm_logprobs, "lm_logprobs")
    dt = compute_dtype(doc_scores, lm_logprobs)
    _check_normal_temperature("retriever_temperature", gamma, dt)
    _check_normal_temperature("lm_temperature", beta, dt)
    log_r = _masked_log_softmax(doc_scores, doc_mask, gamma, dt)
    log_lm = _masked_log_softmax(lm_logprobs.detach(), doc_mask, beta, dt)
    if direction == "retriever||lm":
        return _masked_kl(log_r, log_lm, doc_mask, reduction)
    return _masked_kl(log_lm, log_r, doc_mask, reduction)


__all__ = [
    "mean_token_logprob",
    "emdr2_loss",
    "pdist_loss",
    "loop_loss",
    "adist_loss",
    "lsr_loss",
]
