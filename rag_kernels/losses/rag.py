"""End-to-end RAG losses from generator hidden states: LM head + marginalisation over docs.

``rag_loss`` is the function a training loop calls: the generator ran once per (query, doc)
pair and produced last-layer hidden states ``[B, K, T, H]``; the answer ``target [B, T]`` is
shared by the K documents; ``doc_scores [B, K]`` are the retriever's scores. Gradients reach
the hidden states, the LM-head weight (and bias) and the doc scores.

Label smoothing with ε (``V`` = vocabulary size, ``m`` = token mask, ``pi = log_softmax s``,
``S_bkt = Σ_v log p_bkt(v)``):

* sequence: ``loss_b = -(1-ε) logsumexp_k(pi_bk + Σ_t m lp_bkt)
  - (ε/V) logsumexp_k(pi_bk + Σ_t m S_bkt)`` — transformers' RAG-Sequence smoothing
  without its position-1 prior quirk;
* token: ``loss_b = Σ_t m [-(1-ε) log p_marg(y_t) - (ε/V) Σ_v log p_marg(v)]`` with
  ``p_marg(v) = Σ_k exp(pi_bk) p_bkt(v)`` — standard label smoothing on the marginal.

With K = 1 both reduce to standard label-smoothed cross-entropy summed over the answer
tokens, ``(1-ε)·nll + ε·mean_v(-log p(v))`` per token (what ``F.cross_entropy(...,
label_smoothing=ε)`` computes).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..ops import validation as V
from ..ops import vocab_parallel
from ..ops.linear_logprob import (
    linear_logprob_core,
    make_options,
    validate_linear_logprob_inputs,
)
from ..ops.marginalize import marginalize_core, posterior_core
from ..ops.token_smoothing import (
    TokenSmoothingOptions,
    kernel_target,
    token_smoothing_core,
    validate_token_smoothing_inputs,
)
from .retriever import mean_token_logprob

MODES = ("sequence", "token")


class _GradRowMask(torch.autograd.Function):
    """Identity whose backward zeroes the gradient of rows outside ``keep`` (grad_skip_eps)."""

    @staticmethod
    def forward(ctx, x, keep):
        ctx.save_for_backward(keep)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)), None


class GeneratorFeedback(NamedTuple):
    """Generator signals for the retriever objectives (no gradient)."""

    token_logprobs: torch.Tensor  # [B, K, T] log p(y_t | x, z_k, y_<t); 0 at ignored positions
    sum_logprob: torch.Tensor  # [B, K] log p_LM(y | x, z_k) (LSR, EMDR² answer level)
    mean_logprob: torch.Tensor  # [B, K] mean per-token log-likelihood (Atlas PDist's ḡ)


def validate_rag_inputs(
    hidden, weight, target, doc_scores, bias, ignore_index, softcap, doc_mask, checks,
    vocab_sharded: bool = False,
) -> tuple[int, int, int]:  # fmt: skip
    """Every check of a RAG loss from hidden states, once: ``hidden [B,K,T,H]``, the LM head,
    ``target [B,T]``, ``doc_scores [B,K]``, ``doc_mask``; value checks go to ``checks``
    (``vocab_sharded``: ``weight`` is one vocabulary shard). Returns ``(B, K, T)``."""
    V.check_tensor("hidden", hidden, ndim=4)
    V.check_tensor("doc_scores", doc_scores, ndim=2)
    V.check_index_tensor("target", target, ndim=2)
    B, K, T, _ = hidden.shape
    if doc_scores.shape[0] != B or doc_scores.shape[1] != K:
        raise ValueError(
            f"doc_scores must have shape (B, K) = {(B, K)} to match hidden {tuple(hidden.shape)} "
            f"(K documents per query), got {tuple(doc_scores.shape)}"
        )
    V.check_shape("target", target, (B, T))
    validate_linear_logprob_inputs(
        hidden, weight, target[:, None, :], bias, ignore_index, softcap, checks, vocab_sharded
    )
    validate_token_smoothing_inputs(hidden, weight, doc_scores, bias, softcap, doc_mask, checks)
    return B, K, T


def generator_feedback(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    impl: str = "auto",
    vocab_group=None,
    vocab_start: int | None = None,
) -> GeneratorFeedback:
    """Per-document answer log-likelihoods from hidden states ``[B,K,T,H]`` and target ``[B,T]``,
    computed under ``no_grad`` with the fused LM-head op (no logits): feed them to
    ``rk.retriever.*`` (``emdr2_loss`` takes ``token_logprobs``; ``pdist_loss`` takes
    ``mean_logprob``; ``lsr_loss`` takes ``sum_logprob``). ``vocab_group`` / ``vocab_start``:
    ``weight`` / ``bias`` are this rank's rows of a vocabulary-sharded head (as in
    ``rk.linear_logprob``; one all-gather, the values are the unsharded ones on every rank)."""
    with vocab_parallel.validated_together(vocab_group, hidden):  # a bad rank stops them all
        hidden, weight, bias = V.autocast_inputs(hidden, hidden, weight, bias)
        shard = vocab_parallel.vocab_shard(vocab_group, vocab_start)
        V.check_tensor("hidden", hidden, ndim=4)
        V.check_index_tensor("target", target, ndim=2)
        B, K, T, _ = hidden.shape
        V.check_shape("target", target, (B, T))
        checks = V.ValueChecks()
        validate_linear_logprob_inputs(
            hidden, weight, target[:, None, :], bias, ignore_index, softcap, checks,
            shard is not None,
        )  # fmt: skip
        checks.run()
    opts = make_options(ignore_index, softcap)
    with torch.no_grad():
        if shard is None:
            g = linear_logprob_core(hidden, weight, target[:, None, :], bias, opts, impl, False)
        else:
            g = vocab_parallel.sharded_linear_logprob(
                linear_logprob_core, hidden, weight, target[:, None, :], bias, opts, impl, shard
            ).logprob
        m = target != ignore_index
        total = torch.where(m[:, None, :], g, torch.zeros_like(g)).sum(-1)
        mean = mean_token_logprob(g, m)
    return GeneratorFeedback(g, total, mean)


def _sub_impl(impl: str) -> str:
    # ``impl`` selects the LM-head kernel; the smaller ops follow it where they have that
    # implementation and otherwise take their own best one.
    return "reference" if impl == "reference" else "auto"


def rag_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    doc_scores: torch.Tensor,
    *,
    mode: str = "sequence",
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    doc_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    grad_skip_eps: float = 0.0,
    reduction: str = "mean",
    impl: str = "auto",
    vocab_group=None,
    vocab_start: int | None = None,
    reduce_hidden_grad: bool = True,
) -> torch.Tensor:
    """RAG-Sequence or RAG-Token loss straight from hidden states, without ``[B,K,T,V]`` logits.

    Args:
        hidden: ``[B, K, T, H]`` generator hidden states; ``hidden[b,k,t]`` predicts
            ``target[b,t]`` (shift the labels yourself, as for any causal LM).
        weight: ``[V, H]`` LM-head weight (tied embeddings work as is).
        target: ``[B, T]`` answer token ids, shared by the K documents; ``ignore_index``
            marks positions that do not count (prompt, padding).
        doc_scores: ``[B, K]`` retriever scores.
        mode: ``"sequence"`` or ``"token"``.
        bias: optional ``[V]`` LM-head bias.
        label_smoothing: ε in [0, 1) (definition in the module docstring).
        doc_mask: ``[B, K]`` bool, False for padding documents.
        softcap: optional logit softcap ``c``: ``z -> c tanh(z / c)``.
        grad_skip_eps: rows whose document posterior is below this (per document in sequence
            mode, per (document, token) in token mode) get no gradient through the LM head,
            so the fused backward skips them. The loss value is exact. Error bound: a skipped
            row r of query b had ``dL/dz_r = -w_r g_b (onehot - p_r)`` (nll term), whose l1 norm
            is ``<= 2 eps |g_b|``; the dropped contribution to ``dL/dh_r`` is ``W^T`` of that and
            to ``dL/dW`` its outer product with ``h_r``. Default 0: exact gradients.
        reduction: ``"none"`` -> ``[B]``, ``"sum"``, ``"mean"`` over queries.
        impl: ``"auto" | "triton" | "cpu" | "reference"``.
        vocab_group: a ``torch.distributed`` process group over which the LM head's rows are
            sharded (docs/design.md §2.8): ``weight`` / ``bias`` are this rank's contiguous rows,
            ``vocab_start`` the global id of its first row; ``hidden``, ``target``,
            ``doc_scores`` and ``doc_mask`` are the same on every rank, and every rank gets the
            unsharded loss, its own rows' ``dW`` / ``db``, and the whole ``dh`` and
            ``d doc_scores``. Forward collectives: one all-gather of ``[B K T + 1, 4]`` float64
            per rank; token mode with label smoothing adds one all-reduce of ``[B, T]``.
            Backward: one all-reduce of ``dh`` (unless ``reduce_hidden_grad=False``), and in
            token mode with label smoothing one of ``[B, K, T]``.
        reduce_hidden_grad: with ``vocab_group``, False leaves ``dh`` each shard's own part.

    Under ``torch.autocast`` the LM-head matmuls run in the autocast dtype (fp32 accumulation,
    fp32 log-probs and loss); outside it ``hidden``, ``weight`` and ``bias`` must share a dtype.
    Validates once and reads the value checks with one host synchronisation (with
    ``vocab_group``, a second one after the all-gather checks the shard layout and targets).
    """
    with vocab_parallel.validated_together(vocab_group, hidden):  # a bad rank stops them all
        hidden, weight, bias = V.autocast_inputs(hidden, hidden, weight, bias)
        shard = vocab_parallel.vocab_shard(vocab_group, vocab_start, reduce_hidden_grad)
        checks = V.ValueChecks()
        validate_rag_inputs(
            hidden, weight, target, doc_scores, bias, ignore_index, softcap, doc_mask, checks,
            shard is not None,
        )  # fmt: skip
        V.check_choice("mode", mode, MODES)
        V.check_choice("reduction", reduction, V.REDUCTIONS)
        if not isinstance(grad_skip_eps, (int, float)) or not 0.0 <= grad_skip_eps < 1.0:
            raise ValueError(f"grad_skip_eps must be a float in [0, 1), got {grad_skip_eps!r}")
        if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be a float in [0, 1), got {label_smoothing!r}")
        checks.run()
    return rag_loss_core(
        hidden, weight, target, doc_scores, mode, bias, ignore_index, float(label_smoothing),
        doc_mask, softcap, grad_skip_eps, reduction, impl, shard,
    )  # fmt: skip


def rag_loss_core(
    hidden, weight, target, doc_scores, mode, bias, ignore_index, label_smoothing, doc_mask,
    softcap, grad_skip_eps, reduction, impl, shard: vocab_parallel.VocabShard | None = None,
) -> torch.Tensor:  # fmt: skip
    """:func:`rag_loss` on validated inputs (no checks, no host synchronisation but the
    vocab-parallel layout check); ``shard``: ``weight`` is one shard of a vocab-parallel head."""
    token_mask = target != ignore_index
    sub = _sub_impl(impl)
    token_mode = mode == "token"
    eps, vocab = label_smoothing, weight.shape[0]
    if token_mode and eps > 0:
        # One vocabulary pass gives both the smoothing statistic and the target log-probs.
        opts = TokenSmoothingOptions(softcap=None if softcap is None else float(softcap))
        tgt = kernel_target(target, ignore_index)
        if shard is None:
            per_token, lp = token_smoothing_core(
                hidden, weight, doc_scores, tgt, bias, doc_mask, opts, impl
            )
        else:
            per_token, lp, vocab = vocab_parallel.sharded_token_smoothing(
                token_smoothing_core, linear_logprob_core, hidden, weight, doc_scores, tgt,
                bias, doc_mask, opts, make_options(-1, softcap), impl, shard,
            )  # fmt: skip
        lp = _skip_small_posterior(lp, doc_scores, token_mask, doc_mask, mode, grad_skip_eps)
        smooth = -torch.where(token_mask, per_token, torch.zeros_like(per_token)).sum(dim=-1)
        nll = marginalize_core(lp, doc_scores, token_mask, doc_mask, True, sub)
        return V.reduce_loss((1.0 - eps) * nll + (eps / vocab) * smooth, reduction)
    opts = make_options(ignore_index, softcap)
    # target [B, 1, T]: shared by the K documents, no K-fold copy. Masked documents' rows are
    # ignored rows instead (a [B, K, T] id copy): never computed, whatever they hold.
    rows_target = target[:, None, :]
    if doc_mask is not None:
        rows_target = torch.where(doc_mask[:, :, None], rows_target, ignore_index)
    if shard is None:
        stats = linear_logprob_core(hidden, weight, rows_target, bias, opts, impl, eps > 0)
    else:
        stats = vocab_parallel.sharded_linear_logprob(
            linear_logprob_core, hidden, weight, rows_target, bias, opts, impl, shard
        )
        vocab = stats.vocab_size  # the whole vocabulary (a 0-d tensor: no host sync)
        stats = stats if eps > 0 else stats.logprob
    lp = stats.logprob if eps > 0 else stats
    lp = _skip_small_posterior(lp, doc_scores, token_mask, doc_mask, mode, grad_skip_eps)
    loss = marginalize_core(lp, doc_scores, token_mask, doc_mask, token_mode, sub)
    if eps > 0:  # sequence mode: the per-row sum of log-probs suffices
        smooth = marginalize_core(stats.sum_logprob, doc_scores, token_mask, doc_mask, False, sub)
        loss = (1.0 - eps) * loss + (eps / vocab) * smooth
    return V.reduce_loss(loss, reduction)


def _skip_small_posterior(lp, doc_scores, token_mask, doc_mask, mode, grad_skip_eps):
    if grad_skip_eps <= 0:
        return lp
    post = posterior_core(lp.detach(), doc_scores.detach(), token_mask, doc_mask, mode)
    keep_rows = post >= grad_skip_eps
    return _GradRowMask.apply(lp, keep_rows[..., None] if mode == "sequence" else keep_rows)
