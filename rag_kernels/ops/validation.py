"""Input validation and autocast handling shared by every public function.

Validate once, at the public boundary: a public function checks its arguments, collects its
value checks in one :class:`ValueChecks` and reads them with a single host synchronisation,
then calls the unchecked cores of the ops it composes (which never validate again).

Policy (docs/design.md, "Bad input and NaN policy"):

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

import contextlib
import os
import sys
from collections.abc import Callable, Sequence

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("none", "sum", "mean")
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


def check_ignore_index(
    ignore_index: object, target: torch.Tensor, name: str = "ignore_index"
) -> None:
    """``ignore_index`` (the argument ``name``) is an int that ``target``'s dtype can hold:
    comparing int32 ids with 2**32 would wrap it to 0 and silently ignore the rows whose target
    is 0."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{name} must be an int, got {type(ignore_index).__name__}")
    info = torch.iinfo(target.dtype)
    if not info.min <= ignore_index <= info.max:
        raise ValueError(
            f"{name} must fit target's dtype {target.dtype} ([{info.min}, {info.max}]), "
            f"got {ignore_index}"
        )


def check_mask(
    name: str, x: object, shape: Sequence[int], ref: torch.Tensor
) -> torch.Tensor | None:
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


def check_num_docs(name: str, x: torch.Tensor) -> None:
    """At least one document per query (``x`` is ``[B, K, ...]``); K = 0 would make every loss
    +inf silently."""
    if x.shape[1] == 0:
        raise ValueError(
            f"{name} must have at least one document per query (K >= 1), got shape {tuple(x.shape)}"
        )


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


def _is_batched(x: torch.Tensor) -> bool:
    """``x`` is a ``torch.func.vmap`` batched tensor (one value per sample, none to read)."""
    functorch = getattr(torch._C, "_functorch", None)
    return functorch is not None and bool(functorch.is_batchedtensor(x))


def host_read(flags: torch.Tensor) -> list[bool]:
    """The one host synchronisation of a public call's value checks (tests count calls)."""
    return [bool(f) for f in flags.tolist()]


class ValueChecks:
    """Data-dependent checks of one public call, read with one host synchronisation.

    ``add(bad, fail)`` registers a 0-d bool tensor (True = invalid) and a function that raises
    the error (it may read the data again: that costs a sync only on the failure path).
    ``run()`` stacks the flags, reads them once and raises the first failure. Nothing runs when
    value checks are off (``rk.set_value_checks(False)``) or inside ``torch.compile``; a flag
    computed from inputs batched by ``torch.func.vmap`` has no single value to read and is
    skipped (it failed with "Cannot access data pointer").
    """

    def __init__(self) -> None:
        self.enabled = value_checks_enabled()
        self._flags: list[torch.Tensor] = []
        self._fails: list[Callable[[], None]] = []

    def add(self, bad: torch.Tensor, fail: Callable[[], None]) -> None:
        if self.enabled and not _is_batched(bad):
            self._flags.append(bad.reshape(()))
            self._fails.append(fail)

    def run(self) -> None:
        if not self._flags:
            return
        for flag, fail in zip(host_read(torch.stack(self._flags)), self._fails, strict=True):
            if flag:
                fail()
        self._flags, self._fails = [], []


def check_targets(
    checks: ValueChecks, name: str, target: torch.Tensor, vocab: int, ignore_index: int
) -> None:
    """Value check: every target is in [0, vocab) or equals ignore_index."""
    if not checks.enabled or target.numel() == 0:
        return
    bad = ((target < 0) | (target >= vocab)) & (target != ignore_index)

    def fail():
        raise ValueError(
            f"{name} must hold ids in [0, {vocab}) or ignore_index={ignore_index}, "
            f"got {target[bad][0].item()} ({int(bad.sum())} invalid entries)"
        )

    checks.add(bad.any(), fail)


def check_doc_scores(
    checks: ValueChecks, name: str, scores: torch.Tensor, doc_mask: torch.Tensor | None
) -> None:
    """Value check: unmasked scores finite, masked scores finite or -inf, >=1 doc per query."""
    if not checks.enabled or scores.numel() == 0:
        return
    keep = doc_mask if doc_mask is not None else torch.ones_like(scores, dtype=torch.bool)
    bad_active = keep & ~torch.isfinite(scores)
    bad_masked = ~keep & (torch.isnan(scores) | (scores == float("inf")))
    empty = ~keep.any(dim=-1)

    def fail_active():
        idx = tuple(bad_active.nonzero()[0].tolist())
        raise ValueError(
            f"{name} must be finite on unmasked documents, got {scores[idx].item()} at {idx} "
            "(mask a document with doc_mask instead of a -inf score)"
        )

    def fail_masked():
        idx = tuple(bad_masked.nonzero()[0].tolist())
        raise ValueError(
            f"{name} must be finite or -inf on masked documents, got NaN/+inf at {idx}"
        )

    def fail_empty():
        q = int(empty.nonzero()[0, 0])
        raise ValueError(f"doc_mask must keep at least one document per query, query {q} has none")

    checks.add(bad_active.any(), fail_active)
    checks.add(bad_masked.any(), fail_masked)
    checks.add(empty.any(), fail_empty)


def check_softcap(softcap: object) -> None:
    if softcap is not None and (
        isinstance(softcap, bool)
        or not isinstance(softcap, (int, float))
        or not 0 < softcap < float("inf")
    ):
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap!r}")


def is_dtensor(x: object) -> bool:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor`` (no import: before its module
    is imported no DTensor can exist)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(x, mod.DTensor)


def check_not_dtensor(name: str, x: object) -> None:
    """A DTensor (e.g. a parameter sharded by FSDP2's ``fully_shard``, read outside the
    module's forward) is refused: the fused ops take whole, local tensors. Its local shard
    would be one rank's rows of the head (wrong log-probs, silently), and a gather here would
    be a full copy outside FSDP's own memory accounting."""
    if is_dtensor(x):
        raise TypeError(
            f"{name} must be a plain torch.Tensor, got a DTensor (global shape "
            f"{tuple(x.shape)}, placements {tuple(x.placements)}): a parameter sharded by FSDP2 "
            "(fully_shard) read outside the module's forward. Compute the loss inside a method "
            "FSDP unshards the module for: rk.hf.fsdp_rag_loss_method(model), or "
            "rag_kernels.integrations.fsdp.forward_method(model, fn); not with .to_local() "
            "(one rank's rows only) or .full_tensor() (docs/design.md §2.9)"
        )


def check_lm_head(hidden: torch.Tensor, weight: object, bias: object) -> None:
    """``weight [V, H]`` (and ``bias [V]``) matching ``hidden [..., H]`` in device and dtype;
    none of the three a DTensor (:func:`check_not_dtensor`)."""
    check_not_dtensor("hidden", hidden)
    check_not_dtensor("weight", weight)
    check_not_dtensor("bias", bias)
    check_tensor("weight", weight, ndim=2)
    H = hidden.shape[-1]
    if H == 0:
        raise ValueError(f"hidden must have a hidden size H >= 1, got shape {tuple(hidden.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"weight must have at least one vocabulary row, got {tuple(weight.shape)}")
    if weight.shape[1] != H:
        raise ValueError(
            f"weight must have shape [V, H] with H={H} (hidden's last dim), got {tuple(weight.shape)}"
        )
    check_same_device("weight", weight, hidden, "hidden")
    check_same_dtype("weight", weight, hidden, "hidden")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_shape("bias", bias, (weight.shape[0],))
        check_same_device("bias", bias, hidden, "hidden")
        check_same_dtype("bias", bias, hidden, "hidden")


def autocast_dtype(ref: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype in force for ``ref``'s device type, or None outside autocast."""
    if not isinstance(ref, torch.Tensor):  # not validated yet: the checks name it
        return None
    dev = ref.device.type
    if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def autocast_disabled(ref: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off for ``ref``'s device inside an op core: the public function has already
    cast the operands (:func:`autocast_inputs`), and the core's own casts (fp32 scores, fp64
    references) must not be undone by autocast."""
    if autocast_dtype(ref) is None:
        return contextlib.nullcontext()
    return torch.autocast(ref.device.type, enabled=False)


def autocast_inputs(ref: torch.Tensor, *xs: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Cast the matmul operands ``xs`` to the autocast dtype, as ``F.linear`` would under
    ``torch.autocast``: float16/bfloat16/float32 tensors are cast (differentiably, so each
    input's gradient comes back in its own dtype), float64 and None are left alone. Outside
    autocast the inputs are returned unchanged (and mismatched dtypes still raise)."""
    dt = autocast_dtype(ref)
    if dt is None:
        return xs
    return tuple(
        x
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == torch.float64
        else x.to(dt)
        for x in xs
    )


def reduce_loss(per_query: torch.Tensor, reduction: str) -> torch.Tensor:
    """``reduction`` of a per-query loss: ``"none"`` (as is), ``"sum"``, ``"mean"`` (an empty
    batch gives NaN, torch's convention)."""
    if reduction == "none":
        return per_query
    return per_query.sum() if reduction == "sum" else per_query.mean()
