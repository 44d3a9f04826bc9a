"""Tier 4: the co-training application behind ``rag-kernels train | eval | demo``.

* :mod:`.assets` — the offline default models (shipped in PyPI packages), tiny test models;
* :mod:`.models` — generator loading and aligned RAG batches for causal LMs;
* :mod:`.retrieval` — the bi-encoder retriever and the FAISS index;
* :mod:`.data` — the embedded default data set and JSONL loaders;
* :mod:`.eval` — retrieval and answer metrics;
* :mod:`.training` — configuration and the training loop (one step, top to bottom);
* :mod:`.demo`, :mod:`.cli` — the one-minute tour and the command line.

Needs the ``train`` / ``models`` extras (transformers, faiss, ...). Imports every tier below
it; nothing below imports it (docs/design.md §5).
"""
