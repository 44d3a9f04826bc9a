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

Two model-level helpers make them hard to use wrong:

* :func:`lm_head` reads a causal LM's or seq2seq generator's head from the model itself,
  ``LMHead(weight, bias, hidden_scale, softcap)``: BART's ``final_logits_bias``, T5's
  tied-embedding ``d_model ** -0.5``, Gemma 2's ``final_logit_softcapping``; a head it does
  not know raises ``ValueError`` instead of being guessed;
* :func:`rag_nll` is ``rag_model(..., labels=labels).loss`` of a ``RagSequenceForGeneration``
  / ``RagTokenForGeneration``: the same question encoder + retriever path, the generator run
  to its last decoder hidden state only, the same defaults from the config.

For causal LMs (Llama, Qwen, Gemma, GPT-2, ...) trained with retrieved documents:

* :func:`build_rag_batch` turns B questions × K documents + B answers into a left-padded
  :class:`RagBatch` (the tokenizer's chat template when it has one) whose answer tokens sit at
  the same positions for the K documents of a query, so one ``target [B, L-1]`` serves all K;
* :func:`rag_hidden` runs the model's base (no LM head, no logits) to ``hidden [B, K, L-1, H]``;
* :func:`causal_rag_loss` is ``rk.rag_loss`` on them with the model's own head::

      batch = rk.hf.build_rag_batch(tokenizer, questions, documents, answers)
      loss = rk.hf.causal_rag_loss(model, batch, doc_scores, mode="sequence")  # [B, K] scores

For encoder–decoder models (BART, mBART, T5, mT5, UMT5) the same three steps:
:func:`build_seq2seq_rag_batch` puts each (question, document) prompt in an encoder row
``[B*K, L]`` (right-padded) and the answer + EOS in ``target [B, T]`` (shared by the K
documents); :func:`seq2seq_rag_hidden` runs the encoder and the decoder on the answer shifted
right by the model's own rule (:func:`seq2seq_decoder_input_ids`) to the decoder's last
hidden states ``[B, K, T, H]``; :func:`seq2seq_rag_loss` is ``rk.rag_loss`` on them with the
model's own head.

Usage::

    import rag_kernels as rk

    # Instead of: loss = rag_model(input_ids=q_ids, attention_mask=q_mask, labels=labels).loss
    loss = rk.hf.rag_nll(rag_model, input_ids=q_ids, attention_mask=q_mask, labels=labels)

    # Or by hand, from hidden states (no logits: gen.model is BART without its LM head)
    gen = rag_model.rag.generator
    head = rk.hf.lm_head(gen)
    hidden = gen.model(input_ids=ctx_ids, attention_mask=ctx_mask,          # [B*K, L]
                       decoder_input_ids=target.repeat_interleave(K, 0))[0]  # [B*K, T, H]
    cfg = rag_model.config
    loss = rk.hf.rag_sequence_get_nll(
        hidden * head.hidden_scale, head.weight, doc_scores, target,  # [B, K], [B, T]
        bias=head.bias, softcap=head.softcap,
        pad_token_id=cfg.generator.pad_token_id,
        bos_token_id=cfg.bos_token_id or cfg.generator.bos_token_id,
        reduce_loss=True, epsilon=cfg.label_smoothing, exclude_bos_score=cfg.exclude_bos_score,
    )

Returns fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch

from ..losses.rag import rag_loss
from ..ops import validation as V
from ..ops import vocab_parallel
from ..ops.linear_logprob import linear_logprob_core, make_options, validate_linear_logprob_inputs
from ..ops.marginalize import marginalize_core
from ..ops.token_smoothing import TokenSmoothingOptions, kernel_target, token_smoothing_core
from .fsdp import check_head_in_root, check_unsharded, forward_method

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


def _validate(
    hidden, weight, doc_scores, target, bias, pad_token_id, epsilon, n_docs, softcap,
    vocab_sharded=False,
):  # fmt: skip
    """Every check of both drop-ins, value checks read once; returns ``((B, K, T), tgt)``
    with ``tgt`` the left-shifted target (:func:`_shift_left`), the one the losses read."""
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
    V.check_ignore_index(pad_token_id, target, name="pad_token_id")
    checks = V.ValueChecks()
    # transformers never reads target[:, 0] (it predicts target[:, 1:]): neither do the checks
    tgt = _shift_left(target, pad_token_id)
    validate_linear_logprob_inputs(
        hidden.reshape(B, K, T, hidden.shape[-1]), weight, tgt[:, None, :], bias, pad_token_id,
        softcap, checks, vocab_sharded,
    )  # fmt: skip
    V.check_doc_scores(checks, "doc_scores", doc_scores, None)
    checks.run()
    return (B, K, T), tgt


def _checked(
    hidden, weight, doc_scores, target, bias, pad_token_id, epsilon, n_docs, softcap,
    reduce_loss, vocab_group, vocab_start, sequence_args=None,
):  # fmt: skip
    """Both drop-ins' argument handling: autocast, the vocab shard, every check (with
    ``sequence_args = (bos_token_id, exclude_bos_score)`` the sequence model's too), a bad
    argument on one rank of ``vocab_group`` stopping every rank. Returns ``(hidden, weight,
    bias, shard, (B, K, T), tgt)`` (``tgt``: the left-shifted target)."""
    with vocab_parallel.validated_together(vocab_group, hidden):
        hidden, weight, bias = V.autocast_inputs(hidden, hidden, weight, bias)
        shard = vocab_parallel.vocab_shard(vocab_group, vocab_start)
        dims, tgt = _validate(
            hidden, weight, doc_scores, target, bias, pad_token_id, epsilon, n_docs, softcap,
            shard is not None,
        )  # fmt: skip
        _check_bool("reduce_loss", reduce_loss)
        if sequence_args is not None:
            _check_int("bos_token_id", sequence_args[0], optional=True)
            _check_bool("exclude_bos_score", sequence_args[1])
    return hidden, weight, bias, shard, dims, tgt


def _shift_left(target: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """transformers' ``cat([target[:, 1:], pad], 1)``: the token each position predicts."""
    pad = torch.full((target.shape[0], 1), pad_token_id, dtype=target.dtype, device=target.device)
    return torch.cat([target[:, 1:], pad], dim=1)


def _token_logprobs(
    hidden, weight, tgt, bias, pad_token_id, softcap, impl, want_stats, B, K, T, shard=None
):
    """Per-row ``lp`` (and ``S``) ``[B, K, T]``; 0 where the shifted target is padding; and
    the vocabulary size (the whole head's, a 0-d tensor, for a vocab-parallel ``shard``)."""
    # [B, 1, T] against hidden [B, K, T, H]: the K documents share the ids (no K-fold copy)
    args = (
        hidden.reshape(B, K, T, hidden.shape[-1]),
        weight,
        tgt[:, None, :],
        bias,
        make_options(pad_token_id, softcap),
        impl,
    )
    if shard is not None:
        st = vocab_parallel.sharded_linear_logprob(linear_logprob_core, *args, shard)
        S = st.sum_logprob.view(B, K, T) if want_stats else None
        return st.logprob.view(B, K, T), S, st.vocab_size
    out = linear_logprob_core(*args, want_stats)
    if want_stats:
        return out.logprob.view(B, K, T), out.sum_logprob.view(B, K, T), weight.shape[0]
    return out.view(B, K, T), None, weight.shape[0]


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
    vocab_group=None,
    vocab_start: int | None = None,
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
        vocab_group, vocab_start: ``weight`` / ``bias`` are this rank's rows of a head sharded
            over that process group by vocabulary (as in ``rk.linear_logprob``); every rank
            gets the unsharded loss and gradients (``V`` in ``eps/V`` is the whole head's).

    Under ``torch.autocast`` the LM-head matmuls run in the autocast dtype (fp32 results).

    Returns: ``[B]`` (or a scalar with ``reduce_loss``), fp32 (fp64 for fp64 inputs).
    """
    hidden, weight, bias, shard, (B, K, T), tgt = _checked(
        hidden, weight, doc_scores, target, bias, pad_token_id, epsilon, n_docs, softcap,
        reduce_loss, vocab_group, vocab_start, (bos_token_id, exclude_bos_score),
    )  # fmt: skip
    lp, S, vocab = _token_logprobs(
        hidden, weight, tgt, bias, pad_token_id, softcap, impl, epsilon != 0, B, K, T, shard
    )
    dt = torch.float64 if torch.float64 in (lp.dtype, doc_scores.dtype) else lp.dtype
    lp = lp.to(dt)
    log_prior = torch.log_softmax(doc_scores.to(dt), dim=1)  # [B, K]
    zero = torch.zeros((), dtype=dt, device=lp.device)
    if T >= 2:
        # The prior rides on shifted position 1 only; a pad there masks it away.
        prior = torch.where((tgt[:, 1] != pad_token_id)[:, None], log_prior, zero)
    else:  # no position 1: the prior takes no part (zero gradient, as in transformers)
        prior = torch.where(torch.zeros_like(log_prior, dtype=torch.bool), log_prior, zero)

    if exclude_bos_score and bos_token_id is not None:
        use_bos = (tgt[:, 0] == bos_token_id).all()  # 0-d bool tensor, stays on the device
        ll = lp[:, :, 1:].sum(dim=-1) + torch.where(use_bos, zero, lp[:, :, 0]) + prior
    else:
        ll = lp.sum(dim=-1) + prior
    loss = -torch.logsumexp(ll, dim=1)  # [B]
    if reduce_loss:
        loss = loss.sum()
    if epsilon != 0:
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
    vocab_group=None,
    vocab_start: int | None = None,
) -> torch.Tensor:
    """``RagTokenForGeneration.get_nll`` on ``seq_logits = hidden @ weight.T (+ bias)``.

    ``loss_b = -(1-eps) sum_t m_bt logsumexp_k (pi_bk + lp_bkt)
    - eps/V sum_t m_bt sum_v log sum_k exp(pi_bk + log p_bkt(v))``, with ``m`` the non-pad
    mask of the left-shifted target. Arguments and shapes as :func:`rag_sequence_get_nll`
    (there is no BOS handling in the token model). The ``epsilon`` term is computed only when
    ``epsilon != 0``, fused with the target log-probs in one pass over the vocabulary (with
    ``vocab_group``: two passes over the shard, :mod:`rag_kernels.ops.vocab_parallel`).

    Returns: ``[B]`` (or a scalar with ``reduce_loss``), fp32 (fp64 for fp64 inputs).
    """
    hidden, weight, bias, shard, (B, K, T), tgt = _checked(
        hidden, weight, doc_scores, target, bias, pad_token_id, epsilon, n_docs, softcap,
        reduce_loss, vocab_group, vocab_start,
    )  # fmt: skip
    keep = tgt != pad_token_id  # [B, T]
    marg = None
    if epsilon != 0:
        # One pass over the vocabulary gives the smoothing statistic and the target log-probs.
        # Padded rows are zeroed first so whatever they hold (NaN included) stays out of dW.
        h = hidden.reshape(B, K, T, hidden.shape[-1])
        h = torch.where(keep[:, None, :, None], h, torch.zeros((), dtype=h.dtype, device=h.device))
        opts = TokenSmoothingOptions(softcap=None if softcap is None else float(softcap))
        ktgt = kernel_target(tgt, pad_token_id)
        if shard is None:
            marg, lp = token_smoothing_core(h, weight, doc_scores, ktgt, bias, None, opts, impl)
            vocab = weight.shape[0]
        else:
            marg, lp, vocab = vocab_parallel.sharded_token_smoothing(
                token_smoothing_core, linear_logprob_core, h, weight, doc_scores, ktgt, bias,
                None, opts, make_options(-1, softcap), impl, shard,
            )  # fmt: skip
    else:
        lp, _, vocab = _token_logprobs(
            hidden, weight, tgt, bias, pad_token_id, softcap, impl, False, B, K, T, shard
        )
    loss = marginalize_core(lp, doc_scores, keep, None, True, _sub_impl(impl, _MARGINALIZE_IMPLS))
    if marg is not None:
        smooth = -torch.where(
            keep, marg, torch.zeros((), dtype=marg.dtype, device=marg.device)
        ).sum(dim=-1)
        loss = (1.0 - epsilon) * loss + (epsilon / vocab) * smooth.to(loss.dtype)
    if reduce_loss:
        loss = loss.sum()
    return loss


# ------------------------------------------------------------------------------------------
# Model-level helpers: the LM head of a transformers model, and the whole RAG loss of a model
# ------------------------------------------------------------------------------------------


class LMHead(NamedTuple):
    """What a transformers model's logits are made of: ``logits = softcap(s * hidden @ W.T + b)``.

    ``weight [V, H]`` and ``bias [V]`` are the model's own tensors (a parameter keeps its
    gradient); ``hidden_scale`` (``s``) multiplies the hidden state before the head (T5's
    tied-embedding ``d_model ** -0.5``), ``softcap`` is ``c`` in ``c * tanh(z / c)`` (Gemma 2/3's
    ``final_logit_softcapping``), None for no capping. Pass ``hidden * hidden_scale``,
    ``weight``, ``bias=bias``, ``softcap=softcap`` to the fused ops.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    hidden_scale: float
    softcap: float | None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The materialised logits ``[..., V]`` of ``hidden [..., H]`` (for checks, not training)."""
        if self.hidden_scale != 1.0:
            hidden = hidden * self.hidden_scale
        z = torch.nn.functional.linear(hidden, self.weight, self.bias)
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


# The heads rag_kernels knows, by transformers class name. Each family's forward computes
# exactly ``lm_head(hidden)`` plus what its entry names (docs/design.md §3.2):
#   "plain"   : logits = lm_head(hidden)
#   "softcap" : logits = c * tanh(lm_head(hidden) / c), c = config.final_logit_softcapping
#   "bart"    : logits = lm_head(decoder hidden) + final_logits_bias   (encoder-decoder)
#   "t5"      : logits = lm_head(decoder hidden * d_model ** -0.5 if scaled)   (encoder-decoder)
_HEAD_FAMILIES: dict[str, str] = {
    "LlamaForCausalLM": "plain",  # also SmolLM / SmolLM2
    "MistralForCausalLM": "plain",
    "Qwen2ForCausalLM": "plain",
    "Qwen3ForCausalLM": "plain",
    "GemmaForCausalLM": "plain",
    "Gemma2ForCausalLM": "softcap",
    "Gemma3ForCausalLM": "softcap",
    "GPT2LMHeadModel": "plain",
    "PhiForCausalLM": "plain",  # its lm_head has a bias
    "Phi3ForCausalLM": "plain",
    "BartForConditionalGeneration": "bart",
    "MBartForConditionalGeneration": "bart",
    "T5ForConditionalGeneration": "t5",
    "MT5ForConditionalGeneration": "t5",
    "UMT5ForConditionalGeneration": "t5",
}
_RAG_CLASSES = ("RagSequenceForGeneration", "RagTokenForGeneration")


def _transformers_class(obj: object, names) -> type | None:
    """The transformers class among ``names`` that ``obj`` is an instance of (by MRO), or None.

    Matched by name and module, so nothing from transformers is imported here.
    """
    for cls in type(obj).__mro__:
        if cls.__name__ in names and cls.__module__.startswith("transformers."):
            return cls
    return None


def _check_forward_not_overridden(obj: object, known: type, what: str, methods) -> None:
    for m in methods:
        if getattr(type(obj), m, None) is not getattr(known, m, None):
            raise ValueError(
                f"{what}: {type(obj).__name__} subclasses transformers' {known.__name__} but "
                f"overrides {m}(), so what it computes cannot be known; pass a "
                f"{known.__name__}, or the tensors your {m}() uses to the ops directly"
            )


def _transformers_major() -> int:
    import transformers  # a transformers model was passed, so this is installed

    return int(transformers.__version__.split(".")[0])


def _t5_scales(model, family_cls: type) -> bool:
    """Whether the T5-family ``forward`` multiplies the decoder output by ``d_model ** -0.5``.

    transformers >= 5 reads ``config.scale_decoder_outputs`` (T5, UMT5; mT5 never scales:
    its weights are always tied there); transformers 4.x scales when
    ``config.tie_word_embeddings``.
    """
    cfg = model.config
    flag = getattr(cfg, "scale_decoder_outputs", None)
    if flag is not None:
        return bool(flag)
    if family_cls.__name__ == "MT5ForConditionalGeneration" and _transformers_major() >= 5:
        return False
    return bool(getattr(cfg, "tie_word_embeddings", True))


def _head_family(model, what: str) -> tuple[type, str]:
    known = _transformers_class(model, _HEAD_FAMILIES)
    if known is None:
        hint = ""
        if any(c.__name__ == "PeftModel" for c in type(model).__mro__):
            hint = " (for a PEFT model, pass model.get_base_model())"
        raise ValueError(
            f"{what}: {type(model).__name__} is not a model whose LM head rag_kernels knows"
            f"{hint}. Known: {', '.join(sorted(_HEAD_FAMILIES))}. For another model, pass its "
            "head's weight / bias (and any logit scaling folded into the hidden states) to the "
            "ops directly, after checking them against the model's logits."
        )
    _check_forward_not_overridden(model, known, what, ("forward",))
    return known, _HEAD_FAMILIES[known.__name__]


def lm_head(model) -> LMHead:
    """The LM head of a transformers causal LM or seq2seq generator, as :class:`LMHead`.

    ``model(...).logits == softcap(hidden_scale * hidden @ weight.T + bias)`` where ``hidden``
    is the last hidden state the model feeds its head (``model.model(...)[0]`` for Llama-like
    models and BART, the decoder output for T5). Everything is read from the model:
    ``get_output_embeddings()`` (which must be a plain ``nn.Linear``; its bias is used),
    BART / mBART's ``final_logits_bias``, T5 / mT5 / UMT5's decoder-output scaling and Gemma 2/3's
    ``config.final_logit_softcapping``. A RAG model gives its generator's head.

    Supported: Llama (SmolLM), Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 (text), GPT-2,
    Phi, Phi-3, BART, mBART, T5, mT5, UMT5 — subclasses too, unless they override ``forward``.

    Raises:
        ValueError (naming the model class) for any other model, a head that is not an
        ``nn.Linear``, or logit scaling it cannot represent.
    """
    if _transformers_class(model, _RAG_CLASSES + ("RagModel",)) is not None:
        gen = model.rag.generator if hasattr(model, "rag") else model.generator
        return lm_head(gen)
    what = "rk.hf.lm_head"
    known, family = _head_family(model, what)
    name = type(model).__name__
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise ValueError(
            f"{what}: {name}'s output embeddings are a {type(head).__name__}, not a plain "
            "torch.nn.Linear (a quantised, adapted or extra-projection head); its logits are "
            "not hidden @ weight.T + bias"
        )
    weight, bias = head.weight, head.bias
    if weight.ndim != 2 or not weight.is_floating_point():
        raise ValueError(
            f"{what}: {name}'s lm_head weight must be a floating-point [V, H] matrix, got "
            f"{weight.dtype} of shape {tuple(weight.shape)}"
        )
    vocab = weight.shape[0]
    scale, softcap = 1.0, None
    if family == "softcap":
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap is not None:
            if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:
                raise ValueError(
                    f"{what}: {name}'s config.final_logit_softcapping must be a positive number "
                    f"or None, got {cap!r}"
                )
            softcap = float(cap)
    elif family == "bart":
        fb = getattr(model, "final_logits_bias", None)
        if not isinstance(fb, torch.Tensor) or tuple(fb.shape) != (1, vocab):
            raise ValueError(
                f"{what}: {name}'s final_logits_bias must be a [1, {vocab}] tensor, got "
                f"{None if fb is None else tuple(getattr(fb, 'shape', ()))}"
            )
        fb = fb[0].to(weight.dtype)
        bias = fb if bias is None else bias + fb
    elif family == "t5":
        if _t5_scales(model, known):
            dim = getattr(model, "model_dim", None) or model.config.d_model
            scale = float(dim) ** -0.5
    return LMHead(weight, bias, scale, softcap)


def _generator_hidden(gen, family, input_ids, attention_mask, decoder_input_ids, decoder_mask):
    """The decoder's last hidden state ``[B*K, T, H]`` the generator feeds its LM head, as its
    own ``forward`` computes it with ``use_cache=False`` (no logits, no hidden_scale yet)."""
    if family == "bart":
        out = gen.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_mask,
            use_cache=False,
        )
        return out[0]
    enc = gen.encoder(input_ids=input_ids, attention_mask=attention_mask)
    dec = gen.decoder(
        input_ids=decoder_input_ids,
        attention_mask=decoder_mask,
        encoder_hidden_states=enc[0],
        encoder_attention_mask=attention_mask,
        use_cache=False,
    )
    return dec[0]


def _retrieve(rag, input_ids, attention_mask, context_input_ids, context_attention_mask,
              doc_scores, n_docs):  # fmt: skip
    """``RagModel.forward``'s question-encoder + retriever path: ``(doc_scores, ctx ids, mask)``."""
    retriever = rag.retriever
    have_all = not (
        context_input_ids is None or context_attention_mask is None or doc_scores is None
    )
    if retriever is None or have_all:
        if not have_all:
            missing = [
                n
                for n, v in (
                    ("context_input_ids", context_input_ids),
                    ("context_attention_mask", context_attention_mask),
                    ("doc_scores", doc_scores),
                )
                if v is None
            ]
            raise ValueError(
                f"rk.hf.rag_nll: the model has no retriever, so context_input_ids, "
                f"context_attention_mask and doc_scores must be given (missing: {', '.join(missing)})"
                "; or set one with rag_model.set_retriever(...)"
            )
        return doc_scores, context_input_ids, context_attention_mask
    if input_ids is None:
        raise ValueError(
            "rk.hf.rag_nll: input_ids (the question) is needed to retrieve: the model has a "
            "retriever and not all of context_input_ids, context_attention_mask, doc_scores "
            "were given"
        )
    q_out = rag.question_encoder(input_ids, attention_mask=attention_mask, return_dict=True)
    q = q_out[0]  # [B, D]
    out = retriever(
        input_ids,
        q.detach().to(device="cpu", dtype=torch.float32).numpy(),
        prefix=getattr(rag.generator.config, "prefix", None),
        n_docs=n_docs,
        return_tensors="pt",
    )
    ctx_ids = out["context_input_ids"].to(input_ids)
    ctx_mask = out["context_attention_mask"].to(input_ids)
    if getattr(rag, "context_encoder_training", False):
        doc_ids = out["tokenized_doc_ids"].to(input_ids)
        doc_mask = out["tokenized_doc_attention_mask"].to(input_ids)
        embeds = rag.ctx_encoder(doc_ids, attention_mask=doc_mask, return_dict=True).pooler_output
        embeds = embeds.view(-1, n_docs, q.shape[1])
    else:
        embeds = out["retrieved_doc_embeds"].to(q)
    scores = torch.bmm(q.unsqueeze(1), embeds.transpose(1, 2)).squeeze(1)
    return scores, ctx_ids, ctx_mask


def rag_nll(
    rag_model,
    *,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    context_input_ids: torch.Tensor | None = None,
    context_attention_mask: torch.Tensor | None = None,
    doc_scores: torch.Tensor | None = None,
    decoder_input_ids: torch.Tensor | None = None,
    decoder_attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    reduce_loss: bool | None = None,
    epsilon: float | None = None,
    exclude_bos_score: bool | None = None,
    n_docs: int | None = None,
    impl: str = "auto",
    vocab_group=None,
    vocab_start: int | None = None,
) -> torch.Tensor:
    """``rag_model(..., labels=labels).loss`` of a transformers RAG model, without the logits.

    For ``RagSequenceForGeneration`` and ``RagTokenForGeneration`` with a BART / mBART /
    T5 / mT5 / UMT5 generator. Runs what the model's ``forward`` runs — the question encoder
    and retriever when the model has a retriever and not all of ``context_input_ids``,
    ``context_attention_mask`` and ``doc_scores`` are given (with the context encoder under
    ``set_context_encoder_for_training``), then the generator's encoder and decoder — but stops
    at the decoder's last hidden state and computes the loss with the fused
    :func:`rag_sequence_get_nll` / :func:`rag_token_get_nll` on :func:`lm_head`, so the
    ``[B*K, T, V]`` logits are never formed. Gradients reach the generator, the question
    encoder (through the retrieved ``doc_scores``) and a caller's ``doc_scores``.

    Defaults are the model's: ``decoder_input_ids = labels`` when not given (the sequence
    model scores ``decoder_input_ids``, the token model ``labels``, as transformers does);
    ``reduce_loss = config.reduce_loss``; ``epsilon = config.label_smoothing``;
    ``exclude_bos_score = config.exclude_bos_score`` (sequence model only);
    ``n_docs = config.n_docs``. ``impl`` selects the fused kernels. ``vocab_group`` /
    ``vocab_start``: the generator's head (its output embeddings, and BART's
    ``final_logits_bias``) holds this rank's rows of a vocabulary-sharded head, passed to the
    drop-ins as is (see :func:`rag_sequence_get_nll`).

    Shapes: ``input_ids [B, L]``, ``context_input_ids [B*K, Lc]``, ``doc_scores [B, K]``,
    ``labels`` / ``decoder_input_ids [B, T]``. Returns ``[B]`` or a scalar
    (``reduce_loss``), fp32 (fp64 for an fp64 model).
    """
    what = "rk.hf.rag_nll"
    known = _transformers_class(rag_model, _RAG_CLASSES)
    if known is None:
        raise ValueError(
            f"{what}: rag_model must be a transformers RagSequenceForGeneration or "
            f"RagTokenForGeneration, got {type(rag_model).__name__}"
        )
    _check_forward_not_overridden(rag_model, known, what, ("forward", "get_nll"))
    token = known.__name__ == "RagTokenForGeneration"
    cfg = rag_model.config
    if labels is None:
        raise ValueError(f"{what}: labels [B, T] is required (the loss is over the labels)")
    if token and exclude_bos_score is not None:
        raise ValueError(
            f"{what}: exclude_bos_score applies to RagSequenceForGeneration only "
            "(RagTokenForGeneration's forward has no such argument)"
        )
    n_docs = cfg.n_docs if n_docs is None else n_docs
    _check_int("n_docs", n_docs)
    reduce_loss = cfg.reduce_loss if reduce_loss is None else reduce_loss
    epsilon = cfg.label_smoothing if epsilon is None else epsilon
    if decoder_input_ids is None:
        decoder_input_ids = labels
    target = labels if token else decoder_input_ids
    V.check_index_tensor("labels" if token else "decoder_input_ids", target, ndim=2)

    rag = rag_model.rag
    gen = rag.generator
    gen_cls, family = _head_family(gen, f"{what} (generator)")
    if family not in ("bart", "t5"):
        raise ValueError(
            f"{what}: the generator must be an encoder-decoder model (BART / mBART / T5 / mT5 / "
            f"UMT5), got {type(gen).__name__}"
        )
    head = lm_head(gen)
    doc_scores, ctx_ids, ctx_mask = _retrieve(
        rag, input_ids, attention_mask, context_input_ids, context_attention_mask, doc_scores,
        n_docs,
    )  # fmt: skip
    dec_ids = decoder_input_ids.repeat_interleave(n_docs, dim=0)
    dec_mask = (
        None
        if decoder_attention_mask is None
        else decoder_attention_mask.repeat_interleave(n_docs, dim=0)
    )
    hidden = _generator_hidden(gen, family, ctx_ids, ctx_mask, dec_ids, dec_mask)
    if head.hidden_scale != 1.0:
        hidden = hidden * head.hidden_scale
    common = dict(
        pad_token_id=cfg.generator.pad_token_id,
        reduce_loss=reduce_loss,
        epsilon=epsilon,
        n_docs=n_docs,
        bias=head.bias,
        softcap=head.softcap,
        impl=impl,
        vocab_group=vocab_group,
        vocab_start=vocab_start,
    )
    if token:
        return rag_token_get_nll(hidden, head.weight, doc_scores, target, **common)
    return rag_sequence_get_nll(
        hidden,
        head.weight,
        doc_scores,
        target,
        # transformers reads config.generator.bos_token_id, which transformers 5's T5Config
        # lacks (AttributeError there): T5 has no BOS, so None, as its get_nll intends.
        bos_token_id=cfg.bos_token_id or getattr(cfg.generator, "bos_token_id", None),
        exclude_bos_score=cfg.exclude_bos_score if exclude_bos_score is None else exclude_bos_score,
        **common,
    )


__all__ = ["LMHead", "lm_head", "rag_nll", "rag_sequence_get_nll", "rag_token_get_nll"]


# ------------------------------------------------------------------------------------------
# Causal-LM RAG: (question, document) prompts left-padded so the answers line up, the body's
# hidden states without logits, and the loss with the model's own head
# ------------------------------------------------------------------------------------------

#: The default prompt (``{document}`` and ``{question}`` are filled in). With a chat template
#: it is the user turn; without one, :data:`PLAIN_ANSWER_CUE` follows it and the BOS precedes.
DEFAULT_RAG_PROMPT = "Context: {document}\nQuestion: {question}\nAnswer with a few words."
PLAIN_ANSWER_CUE = "\nAnswer:"
_PROMPT_FIELDS = ("question", "document")
_RAG_LOSS_OPTIONS = (
    "mode", "label_smoothing", "doc_mask", "grad_skip_eps", "reduction", "impl",
    "vocab_group", "vocab_start",
)  # fmt: skip


class _BatchTensors:
    """What the two batch types share: ``num_queries`` and moving every tensor field."""

    @property
    def num_queries(self) -> int:
        """B."""
        return self.target.shape[0]

    def to(self, device):
        """The batch with its tensors on ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)


@dataclass
class RagBatch(_BatchTensors):
    """B queries × K documents for a causal LM, aligned so one ``target`` serves all K.

    Row ``b*K + k`` of ``input_ids`` is ``prompt(question b, document k) + answer b (+ eos)``,
    left-padded: the answer ends at the last position of every row, so ``hidden[:, :-1]``
    (position t predicts token t+1) puts answer token j at the same position for the K
    documents of query b. Build it with :func:`build_rag_batch`; feed it to
    :func:`rag_hidden` / :func:`causal_rag_loss`.

    Fields:
        input_ids: ``[B*K, L]`` int64, left-padded with the pad id.
        attention_mask: ``[B*K, L]`` int64, 0 on padding.
        position_ids: ``[B*K, L]`` int64, 0 at each row's first real token (0 on padding).
        target: ``[B, L-1]`` int64, the answer ids where ``hidden[:, :-1]`` predicts them,
            ``ignore_index`` elsewhere (prompt, padding).
        n_docs: K.
        ignore_index: the id that marks the positions of ``target`` that do not count.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    target: torch.Tensor
    n_docs: int
    ignore_index: int = -100


def _token_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_prompt(prompt) -> None:
    if prompt is None or callable(prompt):
        return
    if not isinstance(prompt, str):
        raise TypeError(
            "prompt must be None, a format string with {question} and {document}, or a "
            f"callable (question, document) -> str, got {type(prompt).__name__}"
        )
    try:
        fields_ = {f for _, f, _, _ in string.Formatter().parse(prompt) if f is not None}
    except ValueError as e:
        raise ValueError(f"prompt is not a valid format string ({e}): {prompt!r}") from None
    unknown = sorted(fields_ - set(_PROMPT_FIELDS))
    missing = [f for f in _PROMPT_FIELDS if f not in fields_]
    if unknown or missing:
        raise ValueError(
            "prompt must be a format string with the fields {question} and {document} only"
            + (f"; unknown: {', '.join('{' + f + '}' for f in unknown)}" if unknown else "")
            + (f"; missing: {', '.join('{' + f + '}' for f in missing)}" if missing else "")
            + f" (got {prompt!r})"
        )


def _check_limit(name: str, value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def _prompt_content(tokenizer, prompt, question: str, document: str, max_doc_tokens) -> str:
    """The prompt text of one (question, document) pair, the document cut to its first
    ``max_doc_tokens`` tokens (decoded back to text; None: no limit)."""
    if max_doc_tokens is not None:
        doc_ids = _token_ids(tokenizer, document)
        if len(doc_ids) > max_doc_tokens:
            document = tokenizer.decode(doc_ids[:max_doc_tokens])
    if prompt is None:
        return DEFAULT_RAG_PROMPT.format(question=question, document=document)
    if isinstance(prompt, str):
        return prompt.format(question=question, document=document)
    content = prompt(question, document)
    if not isinstance(content, str):
        raise TypeError(
            f"prompt(question, document) must return a str, got {type(content).__name__}"
        )
    return content


def rag_prompt_ids(
    tokenizer,
    question: str,
    document: str,
    *,
    prompt=None,
    chat_template: bool = True,
    max_doc_tokens: int | None = 256,
) -> list[int]:
    """Token ids of the causal-LM prompt for one (question, document) pair; the answer follows.

    The document is cut to its first ``max_doc_tokens`` tokens (decoded back to text; None:
    no limit). ``prompt`` makes the text: None for :data:`DEFAULT_RAG_PROMPT`, a format
    string with ``{question}`` and ``{document}``, or a callable ``(question, document) ->
    str``. When ``chat_template`` and the tokenizer has a chat template, the text is the user
    turn of ``apply_chat_template(..., add_generation_prompt=True)`` (so the answer becomes
    the assistant turn); otherwise it is tokenized as is (with the default prompt:
    :data:`PLAIN_ANSWER_CUE` appended), after the tokenizer's BOS if it has one. Use the same
    arguments at generation time as in :func:`build_rag_batch`.
    """
    _check_prompt(prompt)
    _check_bool("chat_template", chat_template)
    _check_limit("max_doc_tokens", max_doc_tokens)
    for name, value in (("question", question), ("document", document)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    content = _prompt_content(tokenizer, prompt, question, document, max_doc_tokens)
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        return _token_ids(tokenizer, text)
    if prompt is None:
        content += PLAIN_ANSWER_CUE
    bos = getattr(tokenizer, "bos_token_id", None)
    return ([bos] if bos is not None else []) + _token_ids(tokenizer, content)


def _check_str_list(name: str, value: object) -> None:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of str, got {type(value).__name__}")
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(v).__name__}")


def _check_rag_lists(questions, documents, answers) -> tuple[int, int]:
    """``(B, K)`` of B questions, B lists of K documents and B answers, all str."""
    _check_str_list("questions", questions)
    _check_str_list("answers", answers)
    if isinstance(documents, str) or not isinstance(documents, (list, tuple)):
        raise TypeError(
            f"documents must be a list of B lists of str, got {type(documents).__name__}"
        )
    B = len(questions)
    if B == 0:
        raise ValueError("questions must hold at least one question, got an empty list")
    if len(documents) != B or len(answers) != B:
        raise ValueError(
            "questions, documents and answers must have the same length B, got "
            f"{B}, {len(documents)}, {len(answers)}"
        )
    for b, docs in enumerate(documents):
        _check_str_list(f"documents[{b}]", docs)
    K = len(documents[0])
    if K == 0:
        raise ValueError("documents[0] must hold at least one document, got an empty list")
    bad = [b for b, docs in enumerate(documents) if len(docs) != K]
    if bad:
        raise ValueError(
            f"documents must hold the same number K of documents for every question: "
            f"documents[0] has {K}, documents[{bad[0]}] has {len(documents[bad[0]])} (pad with "
            "dummy documents and pass doc_mask to the loss)"
        )
    return B, K


def _answer_token_ids(
    tokenizer, answers, ignore_index, add_eos, max_answer_tokens, pad_token_id
) -> tuple[int, list[list[int]]]:
    """``(pad id, the target ids of every answer)``: the answer's tokens + EOS (``add_eos``),
    cut to ``max_answer_tokens``; the pad id defaults to the tokenizer's pad, else its EOS."""
    _check_int("ignore_index", ignore_index)
    _check_bool("add_eos", add_eos)
    _check_limit("max_answer_tokens", max_answer_tokens)
    _check_int("pad_token_id", pad_token_id, optional=True)
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is None:
        raise ValueError(
            "add_eos=True but the tokenizer has no eos_token_id: set one, or pass add_eos=False"
        )
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = eos
        if pad_token_id is None:
            raise ValueError(
                "the tokenizer has no pad_token_id and no eos_token_id to pad with: set "
                "tokenizer.pad_token, or pass pad_token_id"
            )
    answer_ids = []
    for b, a in enumerate(answers):
        a_ids = _token_ids(tokenizer, a)
        if not a_ids:
            raise ValueError(f"answers[{b}] is empty (it tokenizes to no tokens): {a!r}")
        if add_eos:
            a_ids = a_ids + [eos]
        if max_answer_tokens is not None:
            a_ids = a_ids[:max_answer_tokens]
        if ignore_index in a_ids:
            raise ValueError(
                f"answers[{b}] has a token id equal to ignore_index={ignore_index}; pass an "
                "ignore_index outside the vocabulary (the default -100)"
            )
        answer_ids.append(a_ids)
    return pad_token_id, answer_ids


def build_rag_batch(
    tokenizer,
    questions: list[str],
    documents: list[list[str]],
    answers: list[str],
    *,
    prompt=None,
    chat_template: bool = True,
    max_doc_tokens: int | None = 256,
    max_answer_tokens: int | None = None,
    ignore_index: int = -100,
    add_eos: bool = True,
    pad_token_id: int | None = None,
) -> RagBatch:
    """Causal-LM RAG batch: row ``b*K + k`` = prompt(question b, document k) + answer b.

    Args:
        tokenizer: a transformers tokenizer (``tokenizer(text, add_special_tokens=False)``,
            ``decode``, ``apply_chat_template`` when it has a chat template).
        questions: B questions. documents: B lists of K documents each (the same K for every
            question; pad with dummy documents and pass ``doc_mask`` to the loss otherwise).
        answers: B non-empty answers; the target. ``tokenizer(answer)`` + EOS is appended to
            each of the query's K prompts (with a chat template: the assistant turn).
        prompt, chat_template, max_doc_tokens: as :func:`rag_prompt_ids`.
        max_answer_tokens: at most this many target tokens per query, EOS included; a longer
            answer is cut and gets no EOS (it did not end there). None: no limit.
        ignore_index: the id of the positions of ``target`` that do not count.
        add_eos: append ``tokenizer.eos_token_id`` to each answer (the model learns to stop).
        pad_token_id: the id to left-pad with; default ``tokenizer.pad_token_id``, else its
            ``eos_token_id`` (padding is masked, so its id only needs to be a valid token).

    Left padding (as ``tokenizer.pad(..., padding_side="left")`` would do) makes every row end
    with its answer, so the answer tokens of a query sit at the same positions for its K
    documents and one ``target [B, L-1]`` serves them all; ``position_ids`` count from each
    row's first real token, so padding does not shift the positions the model sees.

    Raises:
        TypeError / ValueError naming the argument: mismatched lengths, a different number of
        documents per question, an empty answer, no pad id, ``add_eos`` without an EOS, an
        answer token equal to ``ignore_index``.
    """
    B, K = _check_rag_lists(questions, documents, answers)
    pad_token_id, answer_ids = _answer_token_ids(
        tokenizer, answers, ignore_index, add_eos, max_answer_tokens, pad_token_id
    )
    rows = []
    for q, docs, a_ids in zip(questions, documents, answer_ids, strict=True):
        for d in docs:
            p = rag_prompt_ids(
                tokenizer, q, d, prompt=prompt, chat_template=chat_template,
                max_doc_tokens=max_doc_tokens,
            )  # fmt: skip
            rows.append(p + a_ids)
    # Left padding by hand: the tensors tokenizer.pad({"input_ids": rows}, padding_side="left",
    # return_tensors="pt") gives when the pad id is the tokenizer's own, but pad() refuses a
    # tokenizer without a pad token (GPT-2, Llama: EOS pads here) and an explicit pad_token_id,
    # so this path would stay for those and the library would only add a second one.
    L = max(len(r) for r in rows)
    ids = torch.full((B * K, L), pad_token_id, dtype=torch.long)
    mask = torch.zeros(B * K, L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, L - len(r) :] = 1
    target = torch.full((B, L - 1), ignore_index, dtype=torch.long)
    for b, a_ids in enumerate(answer_ids):
        # hidden position t predicts token t+1: the answer is the last len(a) tokens of a row
        target[b, L - 1 - len(a_ids) :] = torch.tensor(a_ids, dtype=torch.long)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return RagBatch(ids, mask, position_ids, target, K, ignore_index)


def _check_batch(batch, what: str) -> tuple[int, int, int]:
    """``(B, K, L)`` of a :class:`RagBatch`, its shapes checked."""
    if not isinstance(batch, RagBatch):
        raise TypeError(
            f"{what}: batch must be a rk.hf.RagBatch (build_rag_batch), got {type(batch).__name__}"
        )
    V.check_index_tensor("batch.input_ids", batch.input_ids, ndim=2)
    BK, L = batch.input_ids.shape
    for name in ("attention_mask", "position_ids"):
        t = getattr(batch, name)
        V.check_tensor(f"batch.{name}", t, ndim=2, dtypes=None)
        if tuple(t.shape) != (BK, L):
            raise ValueError(
                f"batch.{name} must have the shape of batch.input_ids {(BK, L)}, got {tuple(t.shape)}"
            )
    K = batch.n_docs
    _check_int("batch.n_docs", K)
    if K <= 0 or BK % K != 0:
        raise ValueError(
            f"batch.n_docs must be a positive divisor of batch.input_ids.shape[0] = {BK}, got {K}"
        )
    if L < 2:
        raise ValueError(f"batch.input_ids must have at least 2 positions, got shape {(BK, L)}")
    V.check_index_tensor("batch.target", batch.target, ndim=2)
    if tuple(batch.target.shape) != (BK // K, L - 1):
        raise ValueError(
            f"batch.target must have shape (B, L-1) = {(BK // K, L - 1)} for batch.input_ids "
            f"{(BK, L)} and n_docs={K}, got {tuple(batch.target.shape)}"
        )
    return BK // K, K, L


def _unwrap(model):
    """``(transformers model, DDP wrapper or None)``; DataParallel is unwrapped (one device)."""
    ddp = None
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            ddp = ddp or model
            model = model.module
        elif isinstance(model, torch.nn.DataParallel):
            model = model.module
        else:
            return model, ddp


def _causal_body(model, what: str):
    """``(head, body)``: the model's LM head and the module its forward feeds to it."""
    _, family = _head_family(model, what)
    head = lm_head(model)
    if family in ("bart", "t5"):
        raise ValueError(
            f"{what}: {type(model).__name__} is an encoder-decoder model; this helper is for "
            "causal LMs (for a RAG model use rk.hf.rag_nll)"
        )
    prefix = getattr(model, "base_model_prefix", "") or ""
    body = getattr(model, prefix, None) if prefix else None
    if not isinstance(body, torch.nn.Module) or body is model:
        get_decoder = getattr(model, "get_decoder", None)
        body = get_decoder() if callable(get_decoder) else None
    if not isinstance(body, torch.nn.Module) or body is model:
        raise ValueError(
            f"{what}: cannot find {type(model).__name__}'s base model (base_model_prefix="
            f"{prefix!r}, get_decoder())"
        )
    return head, body


def rag_hidden(model, batch: RagBatch) -> torch.Tensor:
    """The hidden states ``[B, K, L-1, H]`` that ``model``'s LM head would turn into logits.

    Runs the causal LM's base model (``model.<base_model_prefix>``: ``model.model`` for Llama,
    ``model.transformer`` for GPT-2) on ``batch`` with its ``attention_mask`` and
    ``position_ids``, without the LM head, and applies :func:`lm_head`'s ``hidden_scale``.
    Position t of the result predicts ``batch.target[:, t]``. The batch's tensors are moved
    to the model's input-embedding device.

    ``model`` may be wrapped in ``DistributedDataParallel`` (as ``Trainer`` hands it to
    ``compute_loss`` under torchrun): the call then goes through the wrapper's forward (with
    ``logits_to_keep=1``, the base model's output taken by a forward hook) so DDP
    synchronises the gradients; calling the inner model directly would silently skip that.
    ``DataParallel`` is unwrapped (runs on one device). Run it under ``torch.autocast`` (or
    ``accelerator.autocast()``) for mixed precision: the base model is called directly, not
    through an autocast-patched top-level ``forward``.

    Raises:
        ValueError for a model whose head rk.hf.lm_head does not know, an encoder-decoder
        model, a batch whose shapes do not fit, or an FSDP2-sharded model called outside its
        forward (use :func:`fsdp_rag_loss_method`).
    """
    what = "rk.hf.rag_hidden"
    inner, ddp = _unwrap(model)
    head, body = _causal_body(inner, what)
    check_unsharded(inner, what)
    B, K, L = _check_batch(batch, what)
    device = inner.get_input_embeddings().weight.device
    kwargs = dict(
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        position_ids=batch.position_ids.to(device),
        use_cache=False,
    )
    if ddp is None:
        hidden = body(**kwargs)[0]
    else:
        import inspect

        if "logits_to_keep" not in inspect.signature(type(inner).forward).parameters:
            raise ValueError(
                f"{what}: {type(inner).__name__}.forward has no logits_to_keep argument, so a "
                "DDP-wrapped call would form the full logits; upgrade transformers"
            )
        captured: list[torch.Tensor] = []
        handle = body.register_forward_hook(lambda _m, _a, out: captured.append(out[0]))
        try:
            ddp(**kwargs, logits_to_keep=1)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"{what}: the base model ran {len(captured)} times in one forward")
        hidden = captured[0]
    hidden = hidden[:, :-1]
    if head.hidden_scale != 1.0:
        hidden = hidden * head.hidden_scale
    return hidden.reshape(B, K, L - 1, hidden.shape[-1])


def causal_rag_loss(
    model, batch: RagBatch, doc_scores: torch.Tensor, **rag_loss_kwargs
) -> torch.Tensor:
    """``rk.rag_loss`` of a transformers causal LM on a :class:`RagBatch`, without logits.

    :func:`rag_hidden` + :func:`lm_head` + :func:`rag_kernels.rag_loss`: the LM head's
    ``weight``, ``bias`` and ``softcap`` come from the model, and ``ignore_index`` from the
    batch, so none of them can be forgotten or mismatched. ``doc_scores [B, K]`` are the
    retriever scores (differentiable: the retriever gets the RAG gradient), moved to the
    hidden states' device. ``rag_loss_kwargs``: ``mode`` ("sequence" | "token"),
    ``label_smoothing``, ``doc_mask``, ``grad_skip_eps``, ``reduction`` ("mean" over queries
    by default, "sum", "none"), ``impl``, ``vocab_group`` / ``vocab_start`` (the model's
    head holds this rank's rows of a vocabulary-sharded head). ``model`` may be DDP-wrapped (see
    :func:`rag_hidden`). Under ``torch.autocast`` the body and the fused head run in the
    autocast dtype (fp32 loss).
    """
    return _batch_rag_loss(
        "rk.hf.causal_rag_loss", model, batch, doc_scores, rag_loss_kwargs, seq2seq=False
    )


def _batch_rag_loss(
    what: str, model, batch, doc_scores: torch.Tensor, rag_loss_kwargs: dict, *, seq2seq: bool
) -> torch.Tensor:
    """The shared body of :func:`causal_rag_loss` and :func:`seq2seq_rag_loss`: check the
    options and ``doc_scores`` against the batch, form the hidden states without logits and
    call :func:`rag_kernels.rag_loss` with the model's head and the batch's targets."""
    fixed = {"bias", "softcap", "weight", "ignore_index", "hidden", "target"} & set(rag_loss_kwargs)
    if fixed:
        raise TypeError(
            f"{what}: {', '.join(sorted(fixed))} come from the model (rk.hf.lm_head) and the "
            "batch, not from arguments; call rk.rag_loss directly to override them"
        )
    unknown = sorted(set(rag_loss_kwargs) - set(_RAG_LOSS_OPTIONS))
    if unknown:
        raise TypeError(
            f"{what}: unexpected argument(s) {', '.join(unknown)}; rag_loss options are "
            f"{', '.join(_RAG_LOSS_OPTIONS)}"
        )
    V.check_tensor("doc_scores", doc_scores, ndim=2)
    B, K = (_check_seq2seq_batch(batch, what) if seq2seq else _check_batch(batch, what))[:2]
    if tuple(doc_scores.shape) != (B, K):
        raise ValueError(
            f"{what}: doc_scores must have shape (B, n_docs) = {(B, K)} for this batch, got "
            f"{tuple(doc_scores.shape)}"
        )
    hidden = seq2seq_rag_hidden(model, batch) if seq2seq else rag_hidden(model, batch)
    head = lm_head(_unwrap(model)[0])
    doc_mask = rag_loss_kwargs.pop("doc_mask", None)
    return rag_loss(
        hidden,
        head.weight,
        batch.target.to(hidden.device),
        doc_scores.to(hidden.device),
        bias=head.bias,
        softcap=head.softcap,
        ignore_index=batch.ignore_index,
        doc_mask=None if doc_mask is None else doc_mask.to(hidden.device),
        **rag_loss_kwargs,
    )


__all__ += [
    "DEFAULT_RAG_PROMPT",
    "PLAIN_ANSWER_CUE",
    "RagBatch",
    "build_rag_batch",
    "causal_rag_loss",
    "rag_hidden",
    "rag_prompt_ids",
]


# ------------------------------------------------------------------------------------------
# Seq2seq RAG: the (question, document) prompt is the encoder's input, the answer the decoder's
# ------------------------------------------------------------------------------------------

_SEQ2SEQ_FAMILIES = ("bart", "t5")


@dataclass
class Seq2SeqRagBatch(_BatchTensors):
    """B queries × K documents for an encoder–decoder model (BART, mBART, T5, mT5, UMT5).

    Row ``b*K + k`` of ``input_ids`` is the encoder input prompt(question b, document k),
    right-padded. The decoder reads answer b, the same for the K documents of the query, so one
    ``target [B, T]`` serves all K: the answer's tokens + EOS, right-padded with
    ``ignore_index``. The decoder's input is ``target`` shifted right by the model's own rule
    (:func:`seq2seq_decoder_input_ids`: the decoder start token first), so decoder position t
    predicts ``target[:, t]``. Build it with :func:`build_seq2seq_rag_batch`; feed it to
    :func:`seq2seq_rag_hidden` / :func:`seq2seq_rag_loss`.

    Fields:
        input_ids: ``[B*K, L]`` int64 encoder inputs, right-padded with the pad id.
        attention_mask: ``[B*K, L]`` int64, 0 on padding.
        target: ``[B, T]`` int64 answer ids, ``ignore_index`` after each answer.
        n_docs: K.
        ignore_index: the id that marks the positions of ``target`` that do not count.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target: torch.Tensor
    n_docs: int
    ignore_index: int = -100


def seq2seq_prompt_ids(
    tokenizer,
    question: str,
    document: str,
    *,
    prompt=None,
    max_doc_tokens: int | None = 256,
) -> list[int]:
    """Token ids of the encoder input for one (question, document) pair.

    The prompt text as in :func:`rag_prompt_ids` (``prompt``: None for
    :data:`DEFAULT_RAG_PROMPT`, a format string with ``{question}`` and ``{document}``, or a
    callable; the document cut to ``max_doc_tokens`` tokens), tokenized with the tokenizer's
    own special tokens (BART ``<s> … </s>``, T5 ``… </s>``), as the model was trained to read
    its input. No chat template and no answer cue: the answer is the decoder's.
    """
    _check_prompt(prompt)
    _check_limit("max_doc_tokens", max_doc_tokens)
    for name, value in (("question", question), ("document", document)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    content = _prompt_content(tokenizer, prompt, question, document, max_doc_tokens)
    return list(tokenizer(content)["input_ids"])


def build_seq2seq_rag_batch(
    tokenizer,
    questions: list[str],
    documents: list[list[str]],
    answers: list[str],
    *,
    prompt=None,
    max_doc_tokens: int | None = 256,
    max_answer_tokens: int | None = None,
    ignore_index: int = -100,
    add_eos: bool = True,
    pad_token_id: int | None = None,
) -> Seq2SeqRagBatch:
    """Encoder–decoder RAG batch: encoder row ``b*K + k`` = prompt(question b, document k),
    decoder target ``b`` = answer b (+ EOS).

    Args:
        tokenizer: a transformers tokenizer (``tokenizer(text)``, ``decode``).
        questions, documents, answers: as :func:`build_rag_batch` (B questions, B lists of K
            documents each, B non-empty answers).
        prompt, max_doc_tokens: as :func:`seq2seq_prompt_ids`.
        max_answer_tokens: at most this many target tokens per query, EOS included; a longer
            answer is cut and gets no EOS. None: no limit.
        ignore_index: the id of the positions of ``target`` that do not count.
        add_eos: append ``tokenizer.eos_token_id`` to each answer (the model learns to stop).
        pad_token_id: the id to right-pad the encoder inputs with; default
            ``tokenizer.pad_token_id``, else its ``eos_token_id`` (padding is masked).

    The encoder inputs are right-padded (learned absolute positions, as BART's, count from
    the first token; padding is masked); the answers need no alignment, since the decoder of
    every row starts at the answer: one ``target [B, T]`` serves the K documents.

    Raises:
        TypeError / ValueError naming the argument, as :func:`build_rag_batch`.
    """
    B, K = _check_rag_lists(questions, documents, answers)
    pad_token_id, answer_ids = _answer_token_ids(
        tokenizer, answers, ignore_index, add_eos, max_answer_tokens, pad_token_id
    )
    rows = []
    for b, (q, docs) in enumerate(zip(questions, documents, strict=True)):
        for k, d in enumerate(docs):
            r = seq2seq_prompt_ids(tokenizer, q, d, prompt=prompt, max_doc_tokens=max_doc_tokens)
            if not r:
                raise ValueError(f"the prompt of questions[{b}], documents[{b}][{k}] is empty")
            rows.append(r)
    L = max(len(r) for r in rows)
    ids = torch.full((B * K, L), pad_token_id, dtype=torch.long)
    mask = torch.zeros(B * K, L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    T = max(len(a) for a in answer_ids)
    target = torch.full((B, T), ignore_index, dtype=torch.long)
    for b, a_ids in enumerate(answer_ids):
        target[b, : len(a_ids)] = torch.tensor(a_ids, dtype=torch.long)
    return Seq2SeqRagBatch(ids, mask, target, K, ignore_index)


def _check_seq2seq_batch(batch, what: str) -> tuple[int, int, int, int]:
    """``(B, K, L, T)`` of a :class:`Seq2SeqRagBatch`, its shapes checked."""
    if not isinstance(batch, Seq2SeqRagBatch):
        raise TypeError(
            f"{what}: batch must be a rk.hf.Seq2SeqRagBatch (build_seq2seq_rag_batch), got "
            f"{type(batch).__name__}"
        )
    V.check_index_tensor("batch.input_ids", batch.input_ids, ndim=2)
    BK, L = batch.input_ids.shape
    V.check_tensor("batch.attention_mask", batch.attention_mask, ndim=2, dtypes=None)
    if tuple(batch.attention_mask.shape) != (BK, L):
        raise ValueError(
            f"batch.attention_mask must have the shape of batch.input_ids {(BK, L)}, got "
            f"{tuple(batch.attention_mask.shape)}"
        )
    K = batch.n_docs
    _check_int("batch.n_docs", K)
    if K <= 0 or BK % K != 0:
        raise ValueError(
            f"batch.n_docs must be a positive divisor of batch.input_ids.shape[0] = {BK}, got {K}"
        )
    V.check_index_tensor("batch.target", batch.target, ndim=2)
    B, T = batch.target.shape
    if B != BK // K or T < 1 or L < 1:
        raise ValueError(
            f"batch.target must have shape (B, T) with B = {BK // K} (batch.input_ids {(BK, L)}, "
            f"n_docs={K}) and T >= 1, got {tuple(batch.target.shape)}"
        )
    return B, K, L, T


def _seq2seq_model(model, what: str):
    """The encoder–decoder transformers model, checked (known head, not DDP-wrapped)."""
    inner, ddp = _unwrap(model)
    if ddp is not None:
        raise ValueError(
            f"{what}: a DistributedDataParallel-wrapped encoder-decoder model is not supported "
            "(its forward forms the full [B*K, T, V] logits); pass the module and average the "
            "gradients over the ranks yourself"
        )
    _, family = _head_family(inner, what)
    if family not in _SEQ2SEQ_FAMILIES:
        raise ValueError(
            f"{what}: {type(inner).__name__} is a causal LM; this helper is for encoder-decoder "
            "models (BART, mBART, T5, mT5, UMT5): use rk.hf.rag_hidden / causal_rag_loss"
        )
    return inner


def seq2seq_decoder_input_ids(model, labels: torch.Tensor, *, ignore_index: int = -100):
    """The decoder inputs ``[B, T]`` of ``labels [B, T]``, shifted right by ``model``'s own
    rule: ``prepare_decoder_input_ids_from_labels`` (BART / mBART / T5 families: the decoder
    start token ``config.decoder_start_token_id`` first; mBART moves the last non-pad token to
    the front), else ``_shift_right``. ``ignore_index`` positions become the pad id, as
    transformers does with -100 (they follow the answer, so the causal decoder never reads them
    for a scored position).

    Raises:
        ValueError when the model cannot form them (no ``decoder_start_token_id`` or
        ``pad_token_id`` in its config).
    """
    what = "rk.hf.seq2seq_decoder_input_ids"
    V.check_index_tensor("labels", labels, ndim=2)
    _check_int("ignore_index", ignore_index)
    inner, _ = _unwrap(model)
    if ignore_index != -100:
        labels = labels.masked_fill(labels == ignore_index, -100)
    shift = getattr(inner, "prepare_decoder_input_ids_from_labels", None)
    if not callable(shift):
        shift = getattr(inner, "_shift_right", None)
    if not callable(shift):
        raise ValueError(
            f"{what}: {type(inner).__name__} has no prepare_decoder_input_ids_from_labels / "
            "_shift_right to form its decoder inputs"
        )
    try:
        return shift(labels)
    except (TypeError, ValueError) as e:  # transformers: a None start or pad id in the config
        raise ValueError(
            f"{what}: {type(inner).__name__} cannot form its decoder inputs from the labels "
            f"({' '.join(str(e).split())[:200]}); set config.decoder_start_token_id and "
            "config.pad_token_id"
        ) from e


def seq2seq_rag_hidden(model, batch: Seq2SeqRagBatch, *, return_cross_attentions: bool = False):
    """The decoder hidden states ``[B, K, T, H]`` that ``model``'s LM head would turn into logits.

    Runs the encoder on ``batch.input_ids [B*K, L]`` and the decoder on the shifted answers
    (:func:`seq2seq_decoder_input_ids` of ``batch.target``, repeated for the K documents),
    cross-attending to the encoder states of the row's prompt, without the LM head, and applies
    :func:`lm_head`'s ``hidden_scale`` (T5's tied-embedding ``d_model ** -0.5``). Position t of
    the result predicts ``batch.target[:, t]``. The batch's tensors are moved to the model's
    input-embedding device. What ``model(input_ids, attention_mask, decoder_input_ids,
    use_cache=False)`` computes before its head (the ``tests/test_seq2seq_train.py`` check).

    ``return_cross_attentions``: also return the decoder's cross-attention weights, one
    ``[B*K, heads, T, L]`` tensor per decoder layer (needs eager attention:
    ``model.set_attn_implementation("eager")``).

    Raises:
        ValueError for a causal LM or a model whose head rk.hf.lm_head does not know, a
        DistributedDataParallel-wrapped model, inputs longer than BART's learned positions, a
        batch whose shapes do not fit, no attention weights returned, or an FSDP2-sharded
        model called outside its forward (use :func:`fsdp_rag_loss_method`).
    """
    what = "rk.hf.seq2seq_rag_hidden"
    inner = _seq2seq_model(model, what)
    check_unsharded(inner, what)
    check_unsharded(inner, what)
    _check_bool("return_cross_attentions", return_cross_attentions)
    B, K, L, T = _check_seq2seq_batch(batch, what)
    head = lm_head(inner)
    limit = getattr(inner.config, "max_position_embeddings", None)
    if _head_family(inner, what)[1] == "bart" and isinstance(limit, int) and max(L, T) > limit:
        raise ValueError(
            f"{what}: encoder inputs of {L} and decoder inputs of {T} tokens exceed "
            f"{type(inner).__name__}'s max_position_embeddings={limit} (cut the documents: "
            "max_doc_tokens, or the answers: max_answer_tokens)"
        )
    device = inner.get_input_embeddings().weight.device
    ids = batch.input_ids.to(device)
    mask = batch.attention_mask.to(device)
    dec_ids = seq2seq_decoder_input_ids(
        inner, batch.target.to(device), ignore_index=batch.ignore_index
    ).repeat_interleave(K, dim=0)
    enc = inner.get_encoder()(input_ids=ids, attention_mask=mask)
    extra = {"output_attentions": True} if return_cross_attentions else {}
    out = inner.get_decoder()(
        input_ids=dec_ids,
        encoder_hidden_states=enc[0],
        encoder_attention_mask=mask,
        use_cache=False,
        **extra,
    )
    hidden = out[0]
    if head.hidden_scale != 1.0:
        hidden = hidden * head.hidden_scale
    hidden = hidden.reshape(B, K, T, hidden.shape[-1])
    if not return_cross_attentions:
        return hidden
    cross = getattr(out, "cross_attentions", None)
    if not cross or any(a is None for a in cross):
        raise ValueError(
            f"{what}: {type(inner).__name__} returned no cross-attention weights (they need "
            'eager attention: model.set_attn_implementation("eager"))'
        )
    return hidden, tuple(cross)


def seq2seq_rag_loss(
    model, batch: Seq2SeqRagBatch, doc_scores: torch.Tensor, **rag_loss_kwargs
) -> torch.Tensor:
    """``rk.rag_loss`` of a transformers encoder–decoder model on a :class:`Seq2SeqRagBatch`,
    without logits: :func:`seq2seq_rag_hidden` + :func:`lm_head` (weight, BART's
    ``final_logits_bias``, T5's scale) + :func:`rag_kernels.rag_loss` on the shared
    ``target [B, T]``. ``doc_scores [B, K]`` and ``rag_loss_kwargs`` as
    :func:`causal_rag_loss` (``mode``, ``label_smoothing``, ``doc_mask``, ``grad_skip_eps``,
    ``reduction``, ``impl``, ``vocab_group`` / ``vocab_start``)."""
    return _batch_rag_loss(
        "rk.hf.seq2seq_rag_loss", model, batch, doc_scores, rag_loss_kwargs, seq2seq=True
    )


__all__ += [
    "Seq2SeqRagBatch",
    "build_seq2seq_rag_batch",
    "seq2seq_decoder_input_ids",
    "seq2seq_prompt_ids",
    "seq2seq_rag_hidden",
    "seq2seq_rag_loss",
]


# ------------------------------------------------------------------------------------------
# FSDP2: the loss inside a method FSDP unshards the root (embeddings, LM head) for
# ------------------------------------------------------------------------------------------


def _fsdp_rag_loss(model, batch, doc_scores, **rag_loss_kwargs):
    if isinstance(batch, Seq2SeqRagBatch):
        return seq2seq_rag_loss(model, batch, doc_scores, **rag_loss_kwargs)
    return causal_rag_loss(model, batch, doc_scores, **rag_loss_kwargs)


def fsdp_rag_loss_method(model, *, name: str = "rk_rag_loss"):
    """``rk.hf.causal_rag_loss`` / ``seq2seq_rag_loss`` of a model sharded with FSDP2
    (``fully_shard``), as a method FSDP treats as a forward; returns it.

    ``loss_fn = rk.hf.fsdp_rag_loss_method(model)``, then ``loss_fn(batch, doc_scores,
    **rag_loss_kwargs)`` with a :class:`RagBatch` (causal LM) or :class:`Seq2SeqRagBatch`
    (encoder-decoder) and the options of :func:`causal_rag_loss`. The call runs between
    FSDP's pre- and post-forward hooks (``register_fsdp_forward_method``, via
    :func:`rag_kernels.integrations.fsdp.forward_method`): the root unit (embeddings, final
    norm, LM head) is all-gathered for it, the fused loss reads the whole head as a plain
    tensor, and the head's gradient is reduce-scattered (averaged over the data-parallel
    ranks) in the backward, with no gather beyond FSDP's own. The blocks sharded as their own
    units unshard around their forwards as usual. Each rank passes its own batch; the loss is
    that rank's (mean over its queries), so equal per-rank batches give the gradient of the
    mean over the global batch.

    Call it after ``fully_shard`` (e.g. :func:`rag_kernels.integrations.fsdp.fully_shard_model`:
    each decoder layer, then the root). On a model that is not sharded it is the plain loss.

    Raises:
        ValueError for a model whose head :func:`lm_head` does not know, or whose LM head is
        an FSDP unit of its own (its weight is then gathered only by the head's own forward).
    """
    what = "rk.hf.fsdp_rag_loss_method"
    inner, ddp = _unwrap(model)
    if ddp is not None:
        raise ValueError(
            f"{what}: model is DistributedDataParallel-wrapped; FSDP2 replaces DDP: "
            "fully_shard the model instead of wrapping it"
        )
    _head_family(inner, what)
    check_head_in_root(inner, what)
    return forward_method(inner, _fsdp_rag_loss, name=name)


__all__ += ["fsdp_rag_loss_method"]
