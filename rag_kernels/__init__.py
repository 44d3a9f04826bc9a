"""rag_kernels: fused kernels for generator-retriever co-training in RAG.

Public API (DESIGN.md §3)::

    rk.linear_logprob(hidden, weight, target, ...)          # fused LM-head log-prob
    rk.rag_sequence_loss(token_logprobs, doc_scores, ...)   # marginalisation over docs
    rk.rag_token_loss(token_logprobs, doc_scores, ...)
    rk.rag_loss(hidden, weight, target, doc_scores, ...)    # end to end from hidden states
    rk.hf.rag_sequence_get_nll / rag_token_get_nll          # transformers drop-ins
    rk.retriever.emdr2_loss / pdist_loss / loop_loss / adist_loss / lsr_loss
    rk.contrastive_loss(queries, docs, positives, ...)
    rk.CoTrainingLoss(...)
"""

from . import hf, retriever
from ._backend import cpu_available
from ._validation import set_value_checks
from .cotraining import CoTrainingLoss, CoTrainingOutput
from .losses import GeneratorFeedback, generator_feedback, rag_loss
from .ops.contrastive import contrastive_loss
from .ops.linear_logprob import LinearLogprobOptions, LogprobStats, linear_logprob
from .ops.marginalize import document_posterior, rag_sequence_loss, rag_token_loss

__version__ = "0.1.0"

__all__ = [
    "cpu_available",
    "set_value_checks",
    "linear_logprob",
    "LinearLogprobOptions",
    "LogprobStats",
    "rag_sequence_loss",
    "rag_token_loss",
    "document_posterior",
    "rag_loss",
    "generator_feedback",
    "GeneratorFeedback",
    "hf",
    "retriever",
    "contrastive_loss",
    "CoTrainingLoss",
    "CoTrainingOutput",
]
