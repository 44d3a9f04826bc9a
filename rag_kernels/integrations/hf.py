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

from typing import NamedTuple

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
    ``n_docs = config.n_docs``. ``impl`` selects the fused kernels.

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
