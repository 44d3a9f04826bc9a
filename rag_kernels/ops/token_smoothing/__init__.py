"""RAG-Token label-smoothing statistic: ``sum_v log p_marg(v)`` per (query, token).

Math (docs/design.md §2.3). Per query b, answer position t and vocabulary entry v, with
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

Implementations (op contract, docs/design.md §4): ``reference.py`` (materialising PyTorch,
float64-capable); ``cpu.py`` (compiled C++, csrc/token_smoothing.cpp) and ``triton.py`` (GPU),
both behind :class:`TokenSmoothingFunction`. The fused kernels make one pass over V per (b,t)
that holds all K documents' ``[K, V-tile]`` logits at once, with an online log-sum-exp per
document, and recompute the tiles in the backward. With a target the same pass also yields
each document's target log-prob (:func:`token_smoothing_with_logprob`, what a label-smoothed
RAG-Token loss needs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import registry, vocab_parallel
from .. import validation as V
from ..linear_logprob import check_triton_backward, linear_logprob_core, make_options
from .reference import compute_dtype, token_smoothing_reference

OP = registry.register("token_smoothing", __name__)


@dataclass(frozen=True)
class TokenSmoothingOptions:
    """Non-tensor options of the token-smoothing op."""

    softcap: float | None = None
    # Backward only (Triton): "deterministic" (chunked dz + cuBLAS GEMMs, bitwise
    # reproducible) or "atomic" (one kernel, fp32 atomics); None = $RAG_KERNELS_TRITON_BACKWARD
    # or "deterministic" (token_smoothing/triton.py).
    triton_backward: str | None = None

    def __post_init__(self):
        check_triton_backward(self.triton_backward)


class TokenSmoothingFunction(torch.autograd.Function):
    """Autograd shell shared by the fused kernels (``cpu.py``, ``triton.py``).

    A kernel module provides ``forward(hidden[B,K,T,H], weight[V,H], log_prior[B,K], bias,
    target[B,T] | None, opts) -> (out[B,T], lse[B,K,T], wsum[B,K,T], lp[B,K,T] or [0])``
    storing nothing of size V, and ``backward(hidden, weight, log_prior, bias, target, lse, wsum,
    grad_out | None, grad_lp | None, opts, needs=(hidden, weight, bias)) -> (dh, dW, db)``
    (None where not needed). Masked documents carry ``log_prior = -inf``. The prior's gradient
    is ``sum_t grad_out * wsum`` (``lp`` does not depend on the prior).
    """

    @staticmethod
    def forward(ctx, hidden, weight, log_prior, bias, target, opts, kernels):
        with registry.device_guard(hidden):
            out, lse, wsum, lp = kernels.forward(hidden, weight, log_prior, bias, target, opts)
        ctx.save_for_backward(hidden, weight, log_prior, bias, target, lse, wsum)
        ctx.opts, ctx.kernels = opts, kernels
        ctx.set_materialize_grads(False)
        if target is None:
            ctx.mark_non_differentiable(lp)
        return out, lp

    @staticmethod
    def backward(ctx, grad_out, grad_lp):
        hidden, weight, log_prior, bias, target, lse, wsum = ctx.saved_tensors
        if target is None:
            grad_lp = None
        if grad_out is None and grad_lp is None:
            return None, None, None, None, None, None, None
        if grad_out is not None:
            grad_out = grad_out.to(lse.dtype)
        if grad_lp is not None:
            grad_lp = grad_lp.to(lse.dtype)
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3])
        dh = dw = db = None
        if any(needs):
            with torch.no_grad(), registry.device_guard(hidden):  # not traced: first_order_only
                dh, dw, db = ctx.kernels.backward(
                    hidden, weight, log_prior, bias, target, lse, wsum, grad_out, grad_lp,
                    ctx.opts, needs,
                )  # fmt: skip
        d_prior = None
        if ctx.needs_input_grad[2] and grad_out is not None:
            # Tokens with a zero upstream gradient (ignored positions) are left out exactly, so
            # whatever their rows hold (NaN included) cannot reach the prior's gradient.
            w = torch.where(grad_out[:, None, :] != 0, wsum, torch.zeros((), dtype=wsum.dtype))
            d_prior = torch.einsum("bt,bkt->bk", grad_out, w).to(log_prior.dtype)
        return registry.first_order_only(
            OP,
            (dh, dw, d_prior, db, None, None, None),
            (hidden, weight, log_prior, bias, grad_out, grad_lp),
        )


def log_prior_of(doc_scores: torch.Tensor, doc_mask: torch.Tensor | None, dtype: torch.dtype):
    """``log_softmax_k`` of the unmasked scores in ``dtype``, ``-inf`` on masked documents."""
    s = doc_scores.to(dtype)
    if doc_mask is not None:
        s = torch.where(doc_mask, s, torch.full((), float("-inf"), dtype=dtype, device=s.device))
    return torch.log_softmax(s, dim=-1)


def validate_token_smoothing_inputs(
    hidden, weight, doc_scores, bias, softcap, doc_mask, checks: V.ValueChecks
) -> None:
    """Structural checks (raise now) and the doc-score value checks (added to ``checks``)."""
    V.check_tensor("hidden", hidden, ndim=4)
    V.check_lm_head(hidden, weight, bias)
    V.check_tensor("doc_scores", doc_scores, ndim=2)
    B, K, T, H = hidden.shape
    V.check_num_docs("hidden", hidden)
    if tuple(doc_scores.shape) != (B, K):
        raise ValueError(
            f"doc_scores must have shape (B, K) = {(B, K)} to match hidden {tuple(hidden.shape)}, "
            f"got {tuple(doc_scores.shape)}"
        )
    V.check_same_device("doc_scores", doc_scores, hidden, "hidden")
    V.check_softcap(softcap)
    V.check_mask("doc_mask", doc_mask, (B, K), hidden)
    V.check_doc_scores(checks, "doc_scores", doc_scores, doc_mask)


def token_smoothing_core(
    hidden, weight, doc_scores, target, bias, doc_mask, opts: TokenSmoothingOptions, impl: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(out[B,T], lp[B,K,T] or None)`` on validated inputs (no checks, no host sync).

    ``target [B,T]`` (negative = ignored: out and lp 0 there) or None. Fused impls produce both from one
    vocabulary pass; the reference computes ``lp`` with the reference LM-head op.
    """
    with V.autocast_disabled(hidden):
        impl = registry.resolve(OP, impl, hidden)
        B, K, T, _ = hidden.shape
        if B * T == 0:  # nothing to compute; keep the graph so that backward still works
            out_dt = compute_dtype(hidden, doc_scores)
            zero = hidden.sum() + weight[:0].sum() + doc_scores.sum()
            out = zero.to(out_dt) + hidden.new_zeros(B, T, dtype=out_dt)
            lp = (
                None
                if target is None
                else zero.to(out_dt) + hidden.new_zeros(B, K, T, dtype=out_dt)
            )
            return out, lp
        if impl == "reference":
            if target is not None:
                # Ignored tokens, masked documents: whatever their rows hold stays out (NaN policy).
                tgt = target.clamp(min=-1)[:, None, :]
                if doc_mask is not None:
                    tgt = torch.where(doc_mask[:, :, None], tgt, -1)
                zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
                hidden = torch.where((tgt >= 0)[..., None], hidden, zero)
            out = token_smoothing_reference(
                hidden, weight, doc_scores, bias, opts.softcap, doc_mask
            )
            if target is None:
                return out, None
            lp_opts = make_options(ignore_index=-1, softcap=opts.softcap)
            lp = linear_logprob_core(hidden, weight, tgt, bias, lp_opts, "reference", False)
            return _zero_ignored(out, target), lp
        out_dt = compute_dtype(hidden, doc_scores)
        # fp64 scores keep an fp64 prior (the kernels read it as double / fp32).
        log_prior = log_prior_of(doc_scores, doc_mask, out_dt)
        out, lp = TokenSmoothingFunction.apply(
            hidden.contiguous(),
            weight.contiguous(),
            log_prior,
            None if bias is None else bias.contiguous(),
            None if target is None else target.contiguous(),
            opts,
            registry.kernels(OP, impl),
        )
        if target is None:
            return out.to(out_dt), None
        return _zero_ignored(out.to(out_dt), target), lp


def _zero_ignored(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """With a target, ``out`` is 0 at ignored positions (like ``lp``), in every implementation:
    what their rows hold is not part of any result (NaN policy)."""
    return torch.where(target >= 0, out, torch.zeros((), dtype=out.dtype, device=out.device))


def token_smoothing(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    doc_scores: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    doc_mask: torch.Tensor | None = None,
    impl: str = "auto",
    vocab_group=None,
    vocab_start: int | None = None,
    reduce_hidden_grad: bool = True,
) -> torch.Tensor:
    """``sum_v log sum_k exp(pi_bk + log p_bkt(v))`` for every query b and position t.

    Args:
        hidden: ``[B, K, T, H]`` generator hidden states (query b, document k, position t).
        weight: ``[V, H]`` LM-head weight, same dtype as ``hidden`` (under ``torch.autocast``
            both are cast to the autocast dtype).
        doc_scores: ``[B, K]`` retriever scores (logits of the document prior).
        bias: optional ``[V]`` LM-head bias.
        softcap: optional ``c``: logits become ``c * tanh(z / c)``.
        doc_mask: ``[B, K]`` bool, True for real documents; masked documents (whatever their
            hidden states and scores hold) are left out of the prior and the sum over k.
        impl: ``"auto" | "triton" | "cpu" | "reference"``.
        vocab_group, vocab_start, reduce_hidden_grad: a vocabulary-sharded head, as in
            ``rk.linear_logprob`` (:mod:`rag_kernels.ops.vocab_parallel`: the same kernels on
            the shard with a per-token shifted prior; forward one all-gather of
            ``[B K T + 1, 4]`` float64 and one all-reduce of ``[B, T]``; backward one
            all-reduce of ``[B, K, T]`` and, unless ``reduce_hidden_grad=False``, of ``dh``).

    Returns: ``[B, T]`` fp32 (fp64 when ``hidden`` or ``doc_scores`` is fp64), differentiable
    with respect to ``hidden``, ``weight``, ``bias`` and ``doc_scores``.
    """
    with vocab_parallel.validated_together(vocab_group, hidden):  # a bad rank stops them all
        hidden, weight, bias = V.autocast_inputs(hidden, hidden, weight, bias)
        shard = vocab_parallel.vocab_shard(vocab_group, vocab_start, reduce_hidden_grad)
        checks = V.ValueChecks()
        validate_token_smoothing_inputs(hidden, weight, doc_scores, bias, softcap, doc_mask, checks)
        checks.run()
    opts = TokenSmoothingOptions(softcap=None if softcap is None else float(softcap))
    if shard is not None:
        return vocab_parallel.sharded_token_smoothing(
            token_smoothing_core, linear_logprob_core, hidden, weight, doc_scores, None, bias,
            doc_mask, opts, make_options(-1, softcap), impl, shard,
        )[0]  # fmt: skip
    return token_smoothing_core(hidden, weight, doc_scores, None, bias, doc_mask, opts, impl)[0]


def validate_target(
    target, hidden, weight, ignore_index, checks: V.ValueChecks, vocab_sharded: bool = False
) -> None:
    B, K, T, _ = hidden.shape
    V.check_index_tensor("target", target, ndim=2)
    V.check_shape("target", target, (B, T))
    V.check_same_device("target", target, hidden, "hidden")
    V.check_ignore_index(ignore_index, target)
    if vocab_sharded:  # the upper bound is checked after the vocab-parallel all-gather
        vocab_parallel.check_shard_targets(checks, "target", target, ignore_index)
    else:
        V.check_targets(checks, "target", target, weight.shape[0], ignore_index)


def kernel_target(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The kernels' target convention: negative = ignored."""
    return torch.where(target == ignore_index, torch.full_like(target, -1), target)


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
    vocab_group=None,
    vocab_start: int | None = None,
    reduce_hidden_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token_smoothing(...) [B,T], lp [B,K,T])`` where ``lp`` is each document's target
    log-prob; both are 0 at ``ignore_index`` positions, whatever the hidden rows there hold
    (masked documents' lp too): all the LM-head work of a label-smoothed RAG-Token loss
    in one pass over the vocabulary (fused impls); the reference computes the two separately.
    ``vocab_group`` / ``vocab_start`` / ``reduce_hidden_grad``: as in :func:`token_smoothing`
    (``target`` holds global ids; two local passes over the shard, the LM-head one first)."""
    with vocab_parallel.validated_together(vocab_group, hidden):  # a bad rank stops them all
        hidden, weight, bias = V.autocast_inputs(hidden, hidden, weight, bias)
        shard = vocab_parallel.vocab_shard(vocab_group, vocab_start, reduce_hidden_grad)
        checks = V.ValueChecks()
        validate_token_smoothing_inputs(hidden, weight, doc_scores, bias, softcap, doc_mask, checks)
        validate_target(target, hidden, weight, ignore_index, checks, shard is not None)
        checks.run()
    opts = TokenSmoothingOptions(softcap=None if softcap is None else float(softcap))
    tgt = kernel_target(target, ignore_index)
    if shard is not None:
        out, lp, _ = vocab_parallel.sharded_token_smoothing(
            token_smoothing_core, linear_logprob_core, hidden, weight, doc_scores, tgt, bias,
            doc_mask, opts, make_options(-1, softcap), impl, shard,
        )  # fmt: skip
        return out, lp
    return token_smoothing_core(hidden, weight, doc_scores, tgt, bias, doc_mask, opts, impl)


__all__ = [
    "token_smoothing",
    "token_smoothing_with_logprob",
    "token_smoothing_core",
    "TokenSmoothingFunction",
    "TokenSmoothingOptions",
]
