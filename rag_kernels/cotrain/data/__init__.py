"""Data: the passage / question schema, JSONL loaders and the embedded default data set.

>>> from rag_kernels.cotrain.data import load_default
>>> ds = load_default()          # deterministic fictional knowledge base (no network)
>>> ds.save("data/default")      # corpus.jsonl, train.jsonl, dev.jsonl, test.jsonl
"""

from .jsonl import (
    Dataset,
    Passage,
    QAExample,
    load_corpus,
    load_qa,
    read_jsonl,
    write_corpus,
    write_jsonl,
    write_qa,
)
from .synthetic import DEFAULT_SIZES, load_default

__all__ = [
    "Passage",
    "QAExample",
    "Dataset",
    "load_default",
    "DEFAULT_SIZES",
    "load_corpus",
    "load_qa",
    "read_jsonl",
    "write_jsonl",
    "write_corpus",
    "write_qa",
]
