"""Tier 2: losses composed from the ops (nothing here launches a kernel of its own).

* :mod:`.rag` — ``rag_loss`` (LM head + marginalisation, label smoothing) and
  ``generator_feedback`` (the per-document answer likelihoods the retriever objectives use);
* :mod:`.retriever` — retriever objectives fed by the generator (EMDR², PDist, LOOP, ADist, LSR);
* :mod:`.cotraining` — ``CoTrainingLoss``, the weighted generator + retriever objective;
* :mod:`.distributed` — collectives with gradient and ``grad_cache_step`` (GradCache).

Imports only :mod:`rag_kernels.ops` (docs/design.md §5).
"""

from . import distributed, retriever
from .cotraining import CoTrainingLoss, CoTrainingOutput
from .rag import GeneratorFeedback, generator_feedback, rag_loss

__all__ = [
    "rag_loss",
    "generator_feedback",
    "GeneratorFeedback",
    "CoTrainingLoss",
    "CoTrainingOutput",
    "retriever",
    "distributed",
]
