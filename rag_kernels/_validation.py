"""Input validation shared by every public function.

Policy (documented in README "Bad input"):

* Structural checks (rank, shape, dtype, device, argument values) always run and cost
  nothing on the device.
* Value checks (target ids in range, every query keeps a document, finite doc scores)
  read data, which needs one host synchronisation per call. They run by default and are
  skipped inside ``torch.compile`` graphs and when ``rag_kernels.set_value_checks(False)``
  (or ``RAG_KERNELS_VALUE_CHECKS=0``) is set, for code that has already validated its data.
* NaN policy: a NaN in an *active* input (hidden state, weight, unmasked token log-prob)
  propagates to the output; it is never silently dropped. Masked positions (ignored
  tokens, masked documents) are excluded with ``where``, so whatever they hold, NaN
  included, cannot leak into the result. NaN or +inf in a doc score, and -inf on an
  unmasked document, are errors (value check).

Errors are ``TypeError`` for a wrong type/dtype and ``ValueError`` for everything else, and
always name the argument, the expectation and what was received.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_value_checks = os.environ.get("RAG_KERNELS_VALUE_CHECKS", "1") != "0"


def set_value_checks(enabled: bool) -> None:
    """Turn the data-dependent input checks (one host sync per call) on or off globally."""
    global _value_checks
    _value_checks = bool(enabled)


def value_checks_enabled() -> bool:
    if not _value_checks:
        return False
    try:
        return not torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - very old torch
        return True


def check_tensor(
    name: str,
    x: object,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: Sequence[torch.dtype] | None = _FLOAT_DTYPES,
) -> torch.Tensor:
    """Type, rank and dtype of one argument."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        want = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({want}), got {x.dtype}")
    return x


def check_index_tensor(name: str, x: object, *, ndim: int | Sequence[int] | None = None):
    return check_tensor(name, x, ndim=ndim, dtypes=(torch.int64, torch.int32))


def check_mask(name: str, x: object, shape: Sequence[int], ref: torch.Tensor) -> torch.Tensor | None:
    """Optional boolean mask of an exact shape on ``ref``'s device (True = keep)."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
    if x.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = keep), got dtype {x.dtype}")
    check_shape(name, x, shape)
    check_same_device(name, x, ref)
    return x


def check_shape(name: str, x: torch.Tensor, shape: Sequence[int]) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


def check_same_device(name: str, x: torch.Tensor, ref: torch.Tensor, ref_name: str = "") -> None:
    if x.device != ref.device:
        other = f" (the device of {ref_name})" if ref_name else ""
        raise ValueError(f"{name} must be on {ref.device}{other}, got {x.device}")


def check_same_dtype(name: str, x: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {x.dtype}")


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_targets(name: str, target: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Value check: every target is in [0, vocab) or equals ignore_index."""
    if not value_checks_enabled() or target.numel() == 0:
        return
    bad = ((target < 0) | (target >= vocab)) & (target != ignore_index)
    if bool(bad.any()):
        first = target[bad][0].item()
        raise ValueError(
            f"{name} must hold ids in [0, {vocab}) or ignore_index={ignore_index}, "
            f"got {first} ({int(bad.sum())} invalid entries)"
        )


def check_doc_scores(name: str, scores: torch.Tensor, doc_mask: torch.Tensor | None) -> None:
    """Value check: unmasked scores finite, masked scores finite or -inf, >=1 doc per query."""
    if not value_checks_enabled() or scores.numel() == 0:
        return
    keep = doc_mask if doc_mask is not None else torch.ones_like(scores, dtype=torch.bool)
    bad_active = keep & ~torch.isfinite(scores)
    bad_masked = ~keep & (torch.isnan(scores) | (scores == float("inf")))
    empty = ~keep.any(dim=-1)
    flags = torch.stack([bad_active.any(), bad_masked.any(), empty.any()]).tolist()
    if flags[0]:
        idx = tuple(bad_active.nonzero()[0].tolist())
        raise ValueError(
            f"{name} must be finite on unmasked documents, got {scores[idx].item()} at {idx} "
            "(mask a document with doc_mask instead of a -inf score)"
        )
    if flags[1]:
        idx = tuple(bad_masked.nonzero()[0].tolist())
        raise ValueError(f"{name} must be finite or -inf on masked documents, got NaN/+inf at {idx}")
    if flags[2]:
        q = int(empty.nonzero()[0, 0])
        raise ValueError(f"doc_mask must keep at least one document per query, query {q} has none")
