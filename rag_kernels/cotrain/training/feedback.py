"""Generator feedback for the Atlas retriever objectives ``adist`` and ``loop`` (Izacard et
al. 2022, "Atlas: Few-shot Learning with Retrieval Augmented Language Models", §2.2), for
the co-training reader: a causal LM or an encoder–decoder model run on one (passage,
question) prompt per document, whose K answers are marginalised as a RAG mixture with the
retriever prior ``softmax_k(s)``.

* **ADist**: Atlas's reader is Fusion-in-Decoder, whose decoder cross-attends to every
  passage; the score of passage k is its attention mass averaged over layers, heads and
  output tokens. Here the answer attends to the passage within its own prompt: ``a[b, k]`` =
  the attention weight from the positions that predict the answer tokens to the passage's
  tokens, summed over those tokens and averaged over the answer positions, heads and layers
  (``output_attentions``, eager attention). The passage's share of the answer's attention,
  in [0, 1]. For a causal LM (:func:`passage_attention`, :func:`passage_token_mask`) the
  weights are the self-attention of the prompt + answer row; for an encoder–decoder model
  (:func:`passage_cross_attention`, :func:`encoder_passage_mask`) the decoder's
  cross-attention over the encoder positions of the prompt, as in Fusion-in-Decoder.
* **LOOP** (:func:`leave_one_out_nll`): the answer's NLL when document k is removed from
  the reader's context. For this reader, removing document k removes the k-th component of
  the mixture, so the leave-one-out likelihood is exact without K more forward passes::

      log p(y | x, D \\ k) = log sum_{j != k} softmax_{j != k}(s)_j p(y | x, z_j)

  (``--mode sequence``; with ``--mode token`` the mixture is per answer token, as the RAG
  loss trains it). The NLL is divided by the answer length (per token), the scale of PDist's
  target, so the same ``--generator-temperature`` fits both.
"""

from __future__ import annotations

import torch

from ..prompts import DEFAULT_PROMPT_TEMPLATE, format_prompt

__all__ = [
    "encoder_passage_mask",
    "leave_one_out_nll",
    "passage_attention",
    "passage_cross_attention",
    "passage_token_mask",
]

PLAIN_ANSWER_CUE = "\nAnswer:"  # rk.hf.PLAIN_ANSWER_CUE: after the default prompt, no chat template


def _cut(tokenizer, document: str, max_doc_tokens: int) -> str:
    ids = tokenizer(document, add_special_tokens=False)["input_ids"][:max_doc_tokens]
    return tokenizer.decode(ids)


def _prompt_with_spans(tokenizer, template: str, question: str, passage: str):
    """``(ids, spans)``: the prompt's token ids as the batch builder makes them, and the
    passage's character spans in the text those ids were tokenized from; plus the offsets."""
    content, spans = format_prompt(template, passage=passage, question=question)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        at = text.find(content)
        if at < 0:
            raise RuntimeError("the chat template does not hold the prompt text verbatim")
        prefix = []
    else:
        text, at = content + (PLAIN_ANSWER_CUE if template == DEFAULT_PROMPT_TEMPLATE else ""), 0
        bos = getattr(tokenizer, "bos_token_id", None)
        prefix = [bos] if bos is not None else []
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = prefix + list(enc["input_ids"])
    offsets = [(0, 0)] * len(prefix) + [tuple(o) for o in enc["offset_mapping"]]
    return ids, [(at + a, at + b) for a, b in spans], offsets


def _in_passage(a: int, e: int, spans) -> bool:
    """Whether the token of character offsets ``[a, e)`` belongs to a passage span: it
    overlaps one, or it is a whitespace token that byte-level BPE tokenizers give an empty
    offset (``Ġ`` with ``trim_offsets``) strictly inside one. Special tokens have (0, 0)."""
    if e > a:
        return any(a < pe and e > ps for ps, pe in spans)
    return any(ps < a < pe for ps, pe in spans)


def passage_token_mask(
    tokenizer, batch, questions: list[str], documents: list[list[str]], template: str,
    max_doc_tokens: int,
) -> torch.Tensor:  # fmt: skip
    """``[B*K, L]`` bool: True at the tokens of row ``b*K + k``'s passage in ``batch`` (a
    left-padded :class:`~rag_kernels.integrations.hf.RagBatch` of prompt + answer rows).

    The prompt of each row is rebuilt from ``template`` with character offsets (a fast
    tokenizer is needed) and checked token for token against the batch, so the mask cannot
    silently drift from what the generator read; a mismatch is a RuntimeError."""
    BK, L = batch.input_ids.shape
    K = batch.n_docs
    ignore = getattr(batch, "ignore_index", -100)
    answer_len = (batch.target != ignore).sum(-1).tolist()  # [B]
    real_len = batch.attention_mask.sum(-1).tolist()  # [B*K]
    mask = torch.zeros(BK, L, dtype=torch.bool)
    for r in range(BK):
        b, k = divmod(r, K)
        passage = _cut(tokenizer, documents[b][k], max_doc_tokens)
        ids, spans, offsets = _prompt_with_spans(tokenizer, template, questions[b], passage)
        start = L - real_len[r]
        n_prompt = real_len[r] - answer_len[b]
        if batch.input_ids[r, start : start + n_prompt].tolist() != ids:
            raise RuntimeError(
                "adist: the prompt rebuilt to locate the passage tokens differs from the "
                "batch's (tokenizer or prompt builder changed?)"
            )
        for i, (a, e) in enumerate(offsets):
            if _in_passage(a, e, spans):
                mask[r, start + i] = True
    return mask


def encoder_passage_mask(
    tokenizer, batch, questions: list[str], documents: list[list[str]], template: str,
    max_doc_tokens: int,
) -> torch.Tensor:  # fmt: skip
    """``[B*K, L]`` bool: True at the encoder tokens of row ``b*K + k``'s passage in ``batch``
    (a right-padded :class:`~rag_kernels.integrations.hf.Seq2SeqRagBatch` of encoder prompts).

    Each prompt is rebuilt from ``template`` with character offsets (a fast tokenizer is
    needed; the tokenizer's special tokens have empty offsets and are never passage tokens)
    and checked token for token against the batch; a mismatch is a RuntimeError."""
    BK, L = batch.input_ids.shape
    K = batch.n_docs
    real_len = batch.attention_mask.sum(-1).tolist()  # [B*K]
    mask = torch.zeros(BK, L, dtype=torch.bool)
    for r in range(BK):
        b, k = divmod(r, K)
        passage = _cut(tokenizer, documents[b][k], max_doc_tokens)
        content, spans = format_prompt(template, passage=passage, question=questions[b])
        enc = tokenizer(content, return_offsets_mapping=True)
        if batch.input_ids[r, : real_len[r]].tolist() != list(enc["input_ids"]):
            raise RuntimeError(
                "adist: the encoder prompt rebuilt to locate the passage tokens differs from "
                "the batch's (tokenizer or prompt builder changed?)"
            )
        for i, (a, e) in enumerate(enc["offset_mapping"]):
            if _in_passage(a, e, spans):
                mask[r, i] = True
    return mask


def passage_attention(attentions, passage_mask: torch.Tensor, target: torch.Tensor, K: int):
    """``[B, K]`` (detached, fp32): the attention mass from the positions that predict the
    answer (``target [B, L-1] != -100``: position t predicts token t+1) to the passage's
    tokens (``passage_mask [B*K, L]``), averaged over those positions, heads and layers.
    ``attentions``: the per-layer ``[B*K, H, L, L]`` weights of ``output_attentions=True``."""
    q = torch.cat([target != -100, torch.zeros_like(target[:, :1], dtype=torch.bool)], dim=1)
    return _attention_mass(attentions, q, passage_mask, K)  # q [B, L]: answer-predicting


def passage_cross_attention(
    cross_attentions, passage_mask: torch.Tensor, target: torch.Tensor, K: int
) -> torch.Tensor:
    """``[B, K]`` (detached, fp32): adist's passage attention of an encoder–decoder generator:
    the decoder's cross-attention mass from the answer positions (``target [B, T] != -100``:
    decoder position t predicts ``target[:, t]``) to the passage's encoder tokens
    (``passage_mask [B*K, L]``, :func:`encoder_passage_mask`), averaged over those positions,
    heads and decoder layers. ``cross_attentions``: the per-layer ``[B*K, H, T, L]`` weights
    (``rk.hf.seq2seq_rag_hidden(..., return_cross_attentions=True)``)."""
    return _attention_mass(cross_attentions, target != -100, passage_mask, K)


def _attention_mass(attentions, queries: torch.Tensor, keys: torch.Tensor, K: int):
    """``[B, K]``: the attention weight from the ``queries [B, Tq]`` positions (bool, shared by
    the K rows of a query) to the ``keys [B*K, Tk]`` positions, summed over the keys and
    averaged over the queries, the heads and the layers of ``attentions`` (``[B*K, H, Tq,
    Tk]`` each)."""
    if not attentions:
        raise RuntimeError(
            "adist: the generator returned no attention weights (it needs eager attention)"
        )
    B = queries.shape[0]
    q = queries.repeat_interleave(K, dim=0).float()  # [B*K, Tq]
    q = q / q.sum(-1, keepdim=True).clamp(min=1)
    pm = keys.to(q.dtype)
    total = torch.zeros(B * K, device=q.device)
    with torch.no_grad():
        for a in attentions:
            if tuple(a.shape[::2]) != (B * K, q.shape[1]) or a.shape[-1] != pm.shape[-1]:
                raise RuntimeError(
                    f"adist: attention weights of shape {tuple(a.shape)} do not fit "
                    f"{B * K} rows, {q.shape[1]} query and {pm.shape[-1]} key positions"
                )
            per_key = torch.einsum("rhtj,rt->rj", a.detach().float(), q) / a.shape[1]
            total += (per_key * pm).sum(-1)
    return (total / len(attentions)).view(B, K)


def leave_one_out_nll(doc_scores: torch.Tensor, feedback, token_mask: torch.Tensor, mode: str):
    """``[B, K]`` (detached, fp32): the per-token answer NLL of the RAG mixture over the K
    documents without document k (module docstring); ``feedback`` is
    ``rk.generator_feedback`` (``sum_logprob [B, K]``, ``token_logprobs [B, K, T]``),
    ``token_mask [B, T]`` the answer tokens, ``mode`` "sequence" or "token". Needs K >= 2."""
    s = doc_scores.detach().float()
    B, K = s.shape
    if K < 2:
        raise ValueError(f"leave-one-out needs K >= 2 documents, got K={K}")
    removed = torch.eye(K, dtype=torch.bool, device=s.device)  # [k removed, j]
    prior = s[:, None, :].expand(B, K, K).masked_fill(removed, float("-inf"))
    log_prior = torch.log_softmax(prior, dim=-1)  # [B, k, j]: softmax over j != k
    m = token_mask.to(s.device)
    n = m.sum(-1).clamp(min=1).float()  # [B]
    if mode == "sequence":
        g = feedback.sum_logprob.detach().float()  # [B, K]
        ll = torch.logsumexp(log_prior + g[:, None, :], dim=-1)  # [B, k]
    else:
        g = feedback.token_logprobs.detach().float()  # [B, j, T]
        per_token = torch.logsumexp(log_prior[..., None] + g[:, None, :, :], dim=2)  # [B, k, T]
        ll = torch.where(m[:, None, :], per_token, torch.zeros_like(per_token)).sum(-1)
    return -ll / n[:, None]
