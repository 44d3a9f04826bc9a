"""Tier 3: glue to other libraries' models and trainers.

* :mod:`.hf` — transformers RAG ``get_nll`` drop-ins computed from hidden states (``rk.hf``).

Needs nothing beyond torch to import; the libraries it adapts to are imported where used.
Imports :mod:`rag_kernels.ops` and :mod:`rag_kernels.losses` only (docs/design.md §5).
"""

from . import hf

__all__ = ["hf"]
