"""Data: the passage / question schema, JSONL loaders, the common RAG formats (BEIR, DPR,
NQ-open, KILT, FlashRAG; see :mod:`.formats`) and the embedded default data set.

>>> from rag_kernels.cotrain.data import load_default, load_dataset_files
>>> ds = load_default()          # deterministic fictional knowledge base (no network)
>>> ds.save("data/default")      # corpus.jsonl, train.jsonl, dev.jsonl, test.jsonl
>>> ds = load_dataset_files("beir/scifact", "beir/scifact", "beir/scifact")  # auto-detected
"""

from .formats import (
    DATA_FORMATS,
    FORMATS,
    data_path_problem,
    detect_format,
    iter_json_array,
    load_corpus_file,
    load_dataset_files,
    load_questions_file,
    training_answers_problem,
)
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
    "DATA_FORMATS",
    "FORMATS",
    "data_path_problem",
    "detect_format",
    "iter_json_array",
    "load_corpus_file",
    "load_dataset_files",
    "load_questions_file",
    "training_answers_problem",
]
