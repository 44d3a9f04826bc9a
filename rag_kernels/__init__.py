"""rag_kernels: fused kernels for generator-retriever co-training in RAG.

Public API (docs/design.md §3)::

    rk.linear_logprob(hidden, weight, target, ...)          # fused LM-head log-prob
    rk.linear_logprob(..., vocab_group=pg, vocab_start=s)   # the head sharded by vocabulary
    rk.rag_sequence_loss(token_logprobs, doc_scores, ...)   # marginalisation over docs
    rk.rag_token_loss(token_logprobs, doc_scores, ...)
    rk.rag_loss(hidden, weight, target, doc_scores, ...)    # end to end from hidden states
    rk.hf.rag_sequence_get_nll / rag_token_get_nll          # transformers drop-ins
    rk.retriever.emdr2_loss / pdist_loss / loop_loss / adist_loss / lsr_loss
    rk.contrastive_loss(queries, docs, positives, ...)
    rk.CoTrainingLoss(...)
    rk.available_impls(op_name)                             # e.g. ("reference", "cpu")

Layers, imports strictly downward (docs/design.md §5): ``ops`` (kernels) -> ``losses``
(compositions) -> ``integrations`` (transformers glue) -> ``cotrain`` (the application, not
imported here). This module needs only torch (and triton on a GPU).
"""

from .integrations import hf
from .losses import (
    CoTrainingLoss,
    CoTrainingOutput,
    GeneratorFeedback,
    distributed,
    generator_feedback,
    rag_loss,
    retriever,
)
from .ops.contrastive import contrastive_loss
from .ops.linear_logprob import LinearLogprobOptions, LogprobStats, linear_logprob
from .ops.marginalize import document_posterior, rag_sequence_loss, rag_token_loss
from .ops.registry import available_impls, cpu_available
from .ops.token_smoothing import token_smoothing
from .ops.validation import set_value_checks

__version__ = "0.1.0"

__all__ = [
    "available_impls",
    "cpu_available",
    "set_value_checks",
    "linear_logprob",
    "LinearLogprobOptions",
    "LogprobStats",
    "rag_sequence_loss",
    "rag_token_loss",
    "document_posterior",
    "token_smoothing",
    "rag_loss",
    "generator_feedback",
    "GeneratorFeedback",
    "hf",
    "retriever",
    "distributed",
    "contrastive_loss",
    "CoTrainingLoss",
    "CoTrainingOutput",
]
