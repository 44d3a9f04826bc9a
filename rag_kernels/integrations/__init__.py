"""Tier 3: glue to other libraries' models and trainers.

* :mod:`.hf` — transformers: ``lm_head`` (a model's head as weight, bias, scale, softcap),
  ``rag_nll`` (a RAG model's loss without logits) and the ``get_nll`` drop-ins computed from
  hidden states (``rk.hf``), and ``rk.hf.fsdp_rag_loss_method`` for FSDP2-sharded models;
* :mod:`.fsdp` — FSDP2 (``fully_shard``): shard a model per block + root, register a loss as
  an FSDP forward method (the LM head unsharded for it), unshard for no-grad evaluation;
* :mod:`.sentence_transformers` — ``ContrastiveLoss`` / ``CachedContrastiveLoss`` for
  ``SentenceTransformerTrainer`` (MNRL / CachedMNRL semantics, fused and B×M-free).

Needs nothing beyond torch to import; the libraries it adapts to are imported where used.
Imports :mod:`rag_kernels.ops` and :mod:`rag_kernels.losses` only (docs/design.md §5).
"""

from . import fsdp, hf, sentence_transformers

__all__ = ["fsdp", "hf", "sentence_transformers"]
