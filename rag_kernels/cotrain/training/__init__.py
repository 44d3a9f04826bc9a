"""Thin co-training loop (``rag-kernels train``): see loop.py for one step, top to bottom.

``CoTrainer`` is imported lazily (PEP 562) so that the configuration (and the CLI's
validation of it) does not pay for importing the models, FAISS and the training loop.
"""

from .config import TrainConfig, build_parser, resolve_config

__all__ = ["CoTrainer", "TrainConfig", "build_parser", "resolve_config"]


def __getattr__(name: str):
    if name == "CoTrainer":
        from .loop import CoTrainer

        return CoTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
