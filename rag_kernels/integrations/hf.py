"""Drop-in replacements for the RAG losses of HF transformers, without the ``[B·K, T, V]`` logits.

transformers' ``RagSequenceForGeneration.get_nll`` and ``RagTokenForGeneration.get_nll``
(``transformers/models/rag/modeling_rag.py``) take the generator's full logits
``seq_logits [B·K, T, V]``. The functions here take what produces them instead, the
generator's last hidden state ``[B·K, T, H]`` and the LM-head ``weight [V, H]`` (and
``bias``), and return the same loss (float64 parity to ~1e-14) while computing the logits only
tile by tile inside the fused log-prob kernel:

* :func:`rag_sequence_get_nll` replaces ``RagSequenceForGeneration.get_nll(seq_logits,
  doc_scores, target, reduce_loss, epsilon, exclude_bos_score, n_docs)``;
* :func:`rag_token_get_nll` replaces ``RagTokenForGeneration.get_nll(seq_logits, doc_scores,
  target, reduce_loss, epsilon, n_docs)``. With ``epsilon != 0`` its smoothing term and the
  target log-probs come from one fused pass over the vocabulary
  (:func:`rag_kernels.ops.token_smoothing.token_smoothing_with_logprob`).

Every quirk of the originals is kept (docs/design.md §3.2, "transformers compatibility"): ``target`` is shifted
left by one and ``pad_token_id`` appended; positions whose shifted target equals
``pad_token_id`` are masked; RAG-Sequence adds the document prior at shifted position 1 only
(so it vanishes when that position is padding, and when T = 1), and ``exclude_bos_score``
drops shifted position 0 from the likelihood (not from the smoothing term) only when
``bos_token_id`` is not None and every row's first shifted token is ``bos_token_id``;
the loss is ``(1 - epsilon) * nll + epsilon / V * smooth``, per query ``[B]`` or summed
(``reduce_loss=True``). Pass the ``bos_token_id`` transformers would use:
``config.bos_token_id or config.generator.bos_token_id``.

Usage, with a causal-LM or seq2seq generator whose output embeddings are ``lm_head``::

    import rag_kernels as rk

    # Instead of: outputs = rag_model(...)  ->  rag_model.get_nll(outputs.logits, ...)
    gen = rag_model.rag.generator                       # e.g. BartForConditionalGeneration
    out = gen(input_ids=ctx_ids, attention_mask=ctx_mask,   # contextualised inputs, [B*K, L]
              decoder_input_ids=target, output_hidden_states=True)
    hidden = out.decoder_hidden_states[-1]   # [B*K, T, H]; causal LM: out.hidden_states[-1]
    cfg = rag_model.config
    loss = rk.hf.rag_sequence_get_nll(
        hidden, gen.lm_head.weight, doc_scores, target,  # doc_scores [B, K], target [B, T]
        bias=gen.final_logits_bias[0],                   # BART adds this [1, V] buffer; else None
        pad_token_id=cfg.generator.pad_token_id,
        bos_token_id=cfg.bos_token_id or cfg.generator.bos_token_id,
        reduce_loss=True, epsilon=cfg.label_smoothing, exclude_bos_score=cfg.exclude_bos_score,
    )
    # == rag_model.get_nll(gen.lm_head(hidden) + gen.final_logits_bias, doc_scores, target,
    #                      reduce_loss=True, epsilon=..., exclude_bos_score=...)

In a real training loop, run the generator without its LM head (``gen.model(...)`` /
``gen.model.decoder``) so the ``[B*K, T, V]`` logits are never formed. Only the LM head is
fused: any final scaling of the logits (e.g. T5's tied-embedding ``d_model ** -0.5``) must be
folded into ``hidden`` first, and Gemma-style final-logit softcapping is ``softcap=``.
Returns fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch

from ..ops import validation as V
from ..ops.linear_logprob import linear_logprob_core, make_options, validate_linear_logprob_inputs
from ..ops.marginalize import marginalize_core
from ..ops.token_smoothing import TokenSmoothingOptions, kernel_target, token_smoothing_core

_MARGINALIZE_IMPLS = ("reference", "cpu")


def _sub_impl(impl: str, available) -> str:
    """The ``impl`` for a helper op: the caller's choice when that op has it, else ``auto``."""
    return impl if impl == "auto" or impl in available else "auto"


def _check_int(name: str, value: object, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        want = "an int or None" if optional else "an int"
        raise TypeError(f"{name} must be {want}, got {type(value).__name__} ({value!r})")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")


def _validate(hidden, weight, doc_scores, target, bias, pad_token_id, epsilon, n_docs, softcap):
    """Every check of both drop-ins, value checks read once; returns ``(B, K, T)``."""
    V.check_tensor("hidden", hidden, ndim=3)
    V.check_tensor("doc_scores", doc_scores, ndim=2)
    V.check_index_tensor("target", target, ndim=2)
    _check_int("pad_token_id", pad_token_id)
    if (
        isinstance(epsilon, bool)
        or not isinstance(epsilon, (int, float))
        or not 0.0 <= epsilon <= 1.0
    ):
        raise ValueError(f"epsilon must be a number in [0, 1], got {epsilon!r}")
    BK, T, _ = hidden.shape
    K = doc_scores.shape[1] if n_docs is None else n_docs
    _check_int("n_docs", K)
    if K <= 0 or BK % K != 0:
        raise ValueError(
            f"n_docs must be a positive divisor of hidden.shape[0] (B*K = {BK}), got {K}"
            + (" (taken from doc_scores.shape[1])" if n_docs is None else "")
        )
    B = BK // K
    if tuple(doc_scores.shape) != (B, K):
        raise ValueError(
            f"doc_scores must have shape (B, n_docs) = {(B, K)} for hidden {tuple(hidden.shape)}, "
            f"got {tuple(doc_scores.shape)}"
        )
    if T == 0:
        raise ValueError(
            f"hidden must have at least one position (shape [B*K, T, H]), got {tuple(hidden.shape)}"
        )
    if tuple(target.shape) != (B, T):
        raise ValueError(
            f"target must have shape (B, T) = {(B, T)} for hidden {tuple(hidden.shape)} and "
            f"n_docs={K}, got {tuple(target.shape)}"
        )
    V.check_same_device("doc_scores", doc_scores, hidden, "hidden")
    V.check_same_device("target", target, hidden, "hidden")
    checks = V.ValueChecks()
    validate_linear_logprob_inputs(
        hidden.reshape(B, K, T, hidden.shape[-1]), weight, target[:, None, :], bias,
        pad_token_id, softcap, checks,
    )  # fmt: skip
    V.check_doc_scores(checks, "doc_scores", doc_scores, None)
    checks.run()
    return B, K, T


def _shift_left(target: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """transformers' ``cat([target[:, 1:], pad], 1)``: the token each position predicts."""
    pad = torch.full((target.shape[0], 1), pad_token_id, dtype=target.dtype, device=target.device)
    return torch.cat([target[:, 1:], pad], dim=1)


def _token_logprobs(hidden, weight, tgt, bias, pad_token_id, softcap, impl, want_stats, B, K, T):
    """Per-row ``lp`` (and ``S``) ``[B, K, T]``; 0 where the shifted target is padding."""
    # [B, 1, T] against hidden [B, K, T, H]: the K documents share the ids (no K-fold copy)
    out = linear_logprob_core(
        hidden.reshape(B, K, T, hidden.shape[-1]),
        weight,
        tgt[:, None, :],
        bias,
        make_options(pad_token_id, softcap),
        impl,
        want_stats,
    )
    if want_stats:
        return out.logprob.view(B, K, T), out.sum_logprob.view(B, K, T)
    return out.view(B, K, T), None


def rag_sequence_get_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    doc_scores: torch.Tensor,
    target: torch.Tensor,
    *,
    pad_token_id: int,
    bos_token_id: int | None = None,
    reduce_loss: bool = False,
    epsilon: float = 0.0,
    exclude_bos_score: bool = False,
    n_docs: int | None = None,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """``RagSequenceForGeneration.get_nll`` on ``seq_logits = hidden @ weight.T (+ bias)``.

    Args:
        hidden: ``[B*K, T, H]`` generator last hidden states, row ``b*K + k`` = query b, doc k.
        weight: ``[V, H]`` LM-head weight (same dtype as ``hidden``).
        doc_scores: ``[B, K]`` retriever scores.
        target: ``[B, T]`` int64/int32 decoder input ids (``target[:, 0]`` is never scored);
            ids in ``[0, V)`` except ``pad_token_id``.
        pad_token_id: ``config.generator.pad_token_id``.
        bos_token_id: ``config.bos_token_id or config.generator.bos_token_id`` (None for T5).
        reduce_loss: sum over queries (scalar) instead of ``[B]``.
        epsilon: label smoothing, ``loss = (1-eps) nll + eps/V smooth``.
        exclude_bos_score: drop shifted position 0 from the likelihood when every query's
            first shifted token is ``bos_token_id`` (decided on the device, no host sync).
        n_docs: K; defaults to ``doc_scores.shape[1]``.
        bias: optional ``[V]`` LM-head bias. softcap: optional final-logit softcap ``c``.
        impl: ``"auto" | "triton" | "cpu" | "reference"`` for the fused LM head.

    Under ``torch.autocast`` the LM-head matmuls run in the autocast dtype (fp32 results).

    Returns: ``[B]`` (or a scalar with ``reduce_loss``), fp32 (fp64 for fp64 inputs).
    """
    hidden, weight, bias = V.autocast_inputs(hidden, hidden, weight, bias)
    B, K, T = _validate(
        hidden, weight, doc_scores, target, bias, pad_token_id, epsilon, n_docs, softcap
    )
    _check_int("bos_token_id", bos_token_id, optional=True)
    _check_bool("reduce_loss", reduce_loss)
    _check_bool("exclude_bos_score", exclude_bos_score)
    tgt = _shift_left(target, pad_token_id)
    lp, S = _token_logprobs(
        hidden, weight, tgt, bias, pad_token_id, softcap, impl, epsilon != 0, B, K, T
    )
    dt = torch.float64 if torch.float64 in (lp.dtype, doc_scores.dtype) else lp.dtype
    lp = lp.to(dt)
    log_prior = torch.log_softmax(doc_scores.to(dt), dim=1)  # [B, K]
    zero = torch.zeros((), dtype=dt, device=lp.device)
    if T >= 2:
        # The prior rides on shifted position 1 only; a pad there masks it away.
        prior = torch.where((tgt[:, 1] != pad_token_id)[:, None], log_prior, zero)
    else:
        prior = torch.zeros_like(log_prior)

    if exclude_bos_score and bos_token_id is not None:
        use_bos = (tgt[:, 0] == bos_token_id).all()  # 0-d bool tensor, stays on the device
        ll = lp[:, :, 1:].sum(dim=-1) + torch.where(use_bos, zero, lp[:, :, 0]) + prior
    else:
        ll = lp.sum(dim=-1) + prior
    loss = -torch.logsumexp(ll, dim=1)  # [B]
    if reduce_loss:
        loss = loss.sum()
    if epsilon != 0:
        vocab = weight.shape[0]
        smooth = S.to(dt).sum(dim=-1) + vocab * prior
        smooth_loss = -torch.logsumexp(smooth, dim=1)
        if reduce_loss:
            smooth_loss = smooth_loss.sum()
        loss = (1.0 - epsilon) * loss + (epsilon / vocab) * smooth_loss
    return loss


def rag_token_get_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    doc_scores: torch.Tensor,
    target: torch.Tensor,
    *,
    pad_token_id: int,
    reduce_loss: bool = False,
    epsilon: float = 0.0,
    n_docs: int | None = None,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """``RagTokenForGeneration.get_nll`` on ``seq_logits = hidden @ weight.T (+ bias)``.

    ``loss_b = -(1-eps) sum_t m_bt logsumexp_k (pi_bk + lp_bkt)
    - eps/V sum_t m_bt sum_v log sum_k exp(pi_bk + log p_bkt(v))``, with ``m`` the non-pad
    mask of the left-shifted target. Arguments and shapes as :func:`rag_sequence_get_nll`
    (there is no BOS handling in the token model). The ``epsilon`` term is computed only when
    ``epsilon != 0``, fused with the target log-probs in one pass over the vocabulary.

    Returns: ``[B]`` (or a scalar with ``reduce_loss``), fp32 (fp64 for fp64 inputs).
    """
    hidden, weight, bias = V.autocast_inputs(hidden, hidden, weight, bias)
    B, K, T = _validate(
        hidden, weight, doc_scores, target, bias, pad_token_id, epsilon, n_docs, softcap
    )
    _check_bool("reduce_loss", reduce_loss)
    tgt = _shift_left(target, pad_token_id)
    keep = tgt != pad_token_id  # [B, T]
    marg = None
    if epsilon != 0:
        # One pass over the vocabulary gives the smoothing statistic and the target log-probs.
        # Padded rows are zeroed first so whatever they hold (NaN included) stays out of dW.
        h = hidden.reshape(B, K, T, -1)
        h = torch.where(keep[:, None, :, None], h, torch.zeros((), dtype=h.dtype, device=h.device))
        opts = TokenSmoothingOptions(softcap=None if softcap is None else float(softcap))
        marg, lp = token_smoothing_core(
            h, weight, doc_scores, kernel_target(tgt, pad_token_id), bias, None, opts, impl
        )
    else:
        lp, _ = _token_logprobs(
            hidden, weight, tgt, bias, pad_token_id, softcap, impl, False, B, K, T
        )
    loss = marginalize_core(lp, doc_scores, keep, None, True, _sub_impl(impl, _MARGINALIZE_IMPLS))
    if marg is not None:
        vocab = weight.shape[0]
        smooth = -torch.where(
            keep, marg, torch.zeros((), dtype=marg.dtype, device=marg.device)
        ).sum(dim=-1)
        loss = (1.0 - epsilon) * loss + (epsilon / vocab) * smooth.to(loss.dtype)
    if reduce_loss:
        loss = loss.sum()
    return loss


__all__ = ["rag_sequence_get_nll", "rag_token_get_nll"]
