"""Dense retrieval for co-training: a bi-encoder and a FAISS index over the corpus (whole, or
sharded across torch.distributed ranks)."""

from .encoder import DOC_BATCH, BiEncoder, build_tiny_tokenizer, load_retriever
from .index import DenseIndex, ShardedIndex, shard_range

__all__ = [
    "DOC_BATCH",
    "BiEncoder",
    "DenseIndex",
    "ShardedIndex",
    "build_tiny_tokenizer",
    "load_retriever",
    "shard_range",
]
