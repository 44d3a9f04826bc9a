"""Thin co-training loop (``rag-kernels train``): see loop.py for one step, top to bottom."""

from .config import TrainConfig, build_parser, resolve_config
from .loop import CoTrainer

__all__ = ["CoTrainer", "TrainConfig", "build_parser", "resolve_config"]
