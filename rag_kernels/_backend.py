"""Which implementation runs: loading the compiled CPU core, Triton availability, ``impl``.

``impl`` values: ``"triton"`` (GPU kernels; also CPU tensors under ``TRITON_INTERPRET=1``),
``"cpu"`` (compiled C++ from csrc/), ``"reference"`` (plain PyTorch, float64-capable),
``"auto"`` (triton on CUDA tensors, cpu on CPU tensors). When the C++ extension failed to
load, ``"auto"`` on CPU falls back to the reference and one warning is issued.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

IMPLS = ("auto", "triton", "cpu", "reference")

_C = None
_C_ERROR: str | None = None
try:
    _C = importlib.import_module("rag_kernels._C")  # registers torch.ops.rag_kernels.*
except Exception as exc:  # ImportError, or an ABI mismatch surfacing as OSError
    _C = None
    _C_ERROR = f"{type(exc).__name__}: {exc}"

_warned_fallback = False


def cpu_available() -> bool:
    """True when the compiled C++ extension (``rag_kernels._C``) loaded."""
    return _C is not None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def resolve_impl(impl: str, ref: torch.Tensor, *, has_triton: bool = True, has_cpu: bool = True) -> str:
    """Turn ``impl`` into a concrete implementation for tensors on ``ref``'s device.

    ``has_triton`` / ``has_cpu`` say whether the calling op has that implementation yet.
    """
    global _warned_fallback
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {list(IMPLS)}, got {impl!r}")
    if impl == "auto":
        if ref.is_cuda:
            impl = "triton" if has_triton and triton_available() else "reference"
        elif has_cpu and cpu_available():
            return "cpu"
        else:
            if has_cpu and not cpu_available() and not _warned_fallback:
                _warned_fallback = True
                warnings.warn(
                    "rag_kernels: the compiled CPU extension is not available "
                    f"({_C_ERROR}); falling back to the reference implementation. "
                    "Reinstall with `pip install --no-build-isolation -e .` to build it.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return "reference"
    if impl == "cpu":
        if not has_cpu:
            raise ValueError("impl='cpu' is not implemented for this op; use 'reference' or 'auto'")
        if ref.is_cuda:
            raise ValueError(f"impl='cpu' needs CPU tensors, got tensors on {ref.device}")
        if not cpu_available():
            raise RuntimeError(f"impl='cpu' requested but the C++ extension did not load: {_C_ERROR}")
    if impl == "triton":
        if not has_triton:
            raise ValueError("impl='triton' is not implemented for this op; use 'reference' or 'auto'")
        if not triton_available():
            raise RuntimeError("impl='triton' requested but triton is not installed")
        if not ref.is_cuda and not triton_interpret():
            raise ValueError(
                f"impl='triton' needs CUDA tensors (got {ref.device}); on CPU set "
                "TRITON_INTERPRET=1 before importing triton to run the kernels in the interpreter"
            )
    return impl
