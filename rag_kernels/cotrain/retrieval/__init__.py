"""Dense retrieval for co-training: a bi-encoder and a FAISS index over the corpus."""

from .encoder import BiEncoder, build_tiny_tokenizer, load_retriever
from .index import DenseIndex

__all__ = ["BiEncoder", "DenseIndex", "load_retriever", "build_tiny_tokenizer"]
