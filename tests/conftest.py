"""Test-wide settings. TRITON_INTERPRET must be set before triton is first imported so the
Triton kernels run on CPU tensors in the normal suite; nothing may reach a model hub."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def no_models(monkeypatch, tmp_path):
    """Fail the test if a model is loaded (validation must come first); run in tmp_path."""
    from rag_kernels.cotrain.training import loop as loop_module

    monkeypatch.chdir(tmp_path)

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the error was reported")

    monkeypatch.setattr(loop_module, "load_generator", boom)
    monkeypatch.setattr(loop_module, "load_retriever", boom)
